"""Every inbound door of the API is authenticated here (issue #16).

- ``policy``: which access each route needs (default: GET read, anything else operate), roles, principals.
- ``guard``: the one app-wide dependency that checks credentials for the route's access: API keys and the
  identity provider's JWTs (``keys``, ``adapters.jwks``), the EHR's CDS Hooks JWTs (``cds``), signed webhooks
  (``webhooks``); and the start-up refusal without an auth configuration.
- ``middleware``: trusted hosts, CORS (only if configured), the request body limit, the audit trail (``audit``).
"""
