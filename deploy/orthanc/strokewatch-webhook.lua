-- StrokeWatch: tell the engine when a study is complete (Orthanc's StableStudy), instead of it polling /changes.
--
-- Fill in the two values (or let sandbox.orthanc.stable_study_webhook_lua do it), then list this file in Orthanc's
-- configuration: "LuaScripts": ["/etc/orthanc/strokewatch-webhook.lua"] (and "HttpTimeout": 10, Orthanc's timeout of
-- outgoing HTTP calls, so an engine that does not answer holds Orthanc's Lua events briefly). The engine's side:
--   STROKEWATCH_WEBHOOKS__ORTHANC__TOKEN=<the same token, 16+ random characters>
-- The engine keeps following Orthanc's change feed (STROKEWATCH_PACS__KIND=orthanc) as the safety net: a call lost
-- while the engine restarts is found there; one that arrives twice registers the study once.

local WEBHOOK_URL = "@WEBHOOK_URL@"      -- e.g. https://strokewatch.example.org:8400/webhooks/orthanc/stable-study
local WEBHOOK_TOKEN = "@WEBHOOK_TOKEN@"

function OnStableStudy(studyId, tags, metadata)
  local uid = tags and tags["StudyInstanceUID"] or nil
  local body = '{"ID": "' .. studyId .. '"'
  if uid ~= nil and string.match(uid, "^[0-9.]+$") then
    body = body .. ', "StudyInstanceUID": "' .. uid .. '"'
  end
  body = body .. '}'
  local ok, err = pcall(HttpPost, WEBHOOK_URL, body, {
    ["Authorization"] = "Bearer " .. WEBHOOK_TOKEN,
    ["Content-Type"] = "application/json",
    -- Answered at once, registered after: the engine asks this Orthanc about the study, which must not wait for
    -- this very call (Orthanc holds its Lua lock until HttpPost returns).
    ["Prefer"] = "respond-async",
  })
  if not ok then
    -- No patient data here: the Orthanc study id only. The engine's feed finds the study anyway.
    print("StrokeWatch webhook failed for study " .. studyId .. "; the engine's change feed will pick it up")
  end
end
