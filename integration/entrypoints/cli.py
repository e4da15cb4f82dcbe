"""`strokewatch`: the command line. Commands parse options, call one service or runner, and render results."""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="StrokeWatch: stroke-risk assessments from your PACS and EHR, written back as FHIR.", no_args_is_help=True
)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
model_app = typer.Typer(help="Train, evaluate, export and explain the fusion model.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(model_app, name="model")
keys_app = typer.Typer(help="Keys and credentials.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
deid_app = typer.Typer(help="De-identified export of images and records for research.", no_args_is_help=True)
app.add_typer(deid_app, name="deid")
training_app = typer.Typer(help="A site's training set (model inputs + outcomes) for learning across sites.",
                           no_args_is_help=True)
app.add_typer(training_app, name="training-set")
console = Console()

SANDBOX_DIR = Path(os.environ.get("STROKEWATCH_SANDBOX_DIR", "var/sandbox"))
#: `strokewatch run` starts a child that died again, at most this often within the window (then it stops, exit 1).
MAX_RESTARTS, RESTART_WINDOW_S = 5, 600
_PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


def _settings(**overrides: Any) -> Any:
    """Settings from env/config; with no PACS/EHR configured, a running sandbox is used (embedded default)."""
    from integration.config import Settings
    from integration.entrypoints.processes import sandbox_env

    if not os.environ.get("STROKEWATCH_PACS__DICOMWEB_URL") and not os.environ.get("STROKEWATCH_CONFIG"):
        os.environ.update(sandbox_env(SANDBOX_DIR))
    try:
        return Settings(**overrides)
    except Exception as err:  # pydantic ValidationError: show it plainly and stop
        console.print(f"[red]Configuration error:[/red] {err}")
        raise typer.Exit(2) from err


def _logging(level: str = "WARNING") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore"):  # request URLs can carry identifiers (PHI): never at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)


# ---------------------------------------------------------------------------------------------
# running the engine
# ---------------------------------------------------------------------------------------------
@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the database schema to the latest revision."""
    from integration.adapters.db.session import upgrade

    settings = _settings()
    upgrade(settings.db_url)
    console.print("database is at the latest schema revision")


@db_app.command("prune")
def db_prune(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Count what would be removed; delete nothing.")] = False,
) -> None:
    """Delete what the retention settings say is no longer needed, and print how much per table."""
    from integration.bootstrap import open_housekeeping
    from integration.services.retention import TABLES, prune

    _logging()
    settings = _settings()
    with open_housekeeping(settings) as housekeeping:
        report = prune(housekeeping, dry_run=dry_run)
    table = Table("table", "would remove" if dry_run else "removed", title="strokewatch db prune")
    for name in TABLES:
        table.add_row(name, str(report.removed[name]))
    console.print(table)


@app.command()
def run() -> None:
    """Run the engine in the foreground: API + worker + scheduler, and the DICOM SCP when STROKEWATCH_SCP__ENABLED
    (Ctrl-C stops all)."""
    from integration.adapters.db.session import upgrade
    from integration.entrypoints.processes import spawn_child, start_engine, stop_pids

    _logging("INFO")
    settings = _settings()
    upgrade(settings.db_url)
    env = {k: v for k, v in os.environ.items() if k.startswith("STROKEWATCH_")}
    try:
        procs, children = start_engine(settings, env, detached=False)
    except RuntimeError as err:  # a refusal or a child that died at start-up: the message says what to do
        console.print(f"[red]StrokeWatch did not start:[/red] {err}")
        raise typer.Exit(1) from None

    def _terminate(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt  # SIGTERM (systemd, docker stop) stops the children like Ctrl-C

    signal.signal(signal.SIGTERM, _terminate)
    docs = f"  (docs: {procs.api_url}/docs)" if settings.api_docs_enabled else ""
    dicom = f"  DICOM: {settings.scp.ae_title}@{settings.scp.host}:{settings.scp.port}" if procs.scp_pid else ""
    console.print(f"StrokeWatch is running. API: {procs.api_url}{docs}{dicom}  logs: {procs.log_dir}")
    # A child that dies (the OOM killer, a broker client that gives up) is started again, a few times: work it held
    # is released by the reaper and nothing is lost. Dying more often than that is a fault to look at: stop, exit 1
    # (systemd or the container runtime then decides).
    running = dict(zip(("api", "worker", "scp"), children, strict=False))
    restarts: list[float] = []
    try:
        while True:
            time.sleep(1)
            for kind, child in list(running.items()):
                code = child.poll()
                if code is None:
                    continue
                now = time.monotonic()
                restarts = [t for t in restarts if now - t < RESTART_WINDOW_S]
                if len(restarts) >= MAX_RESTARTS:
                    console.print(f"[red]the {kind} exited (code {code}); {len(restarts)} restarts within "
                                  f"{RESTART_WINDOW_S // 60} min already: stopping[/red] (see {procs.log_dir})")
                    raise typer.Exit(1)
                restarts.append(now)
                console.print(f"[yellow]the {kind} exited (code {code}); starting it again ({len(restarts)} of "
                              f"{MAX_RESTARTS} within {RESTART_WINDOW_S // 60} min)[/yellow]")
                running[kind] = spawn_child(kind, settings, env, detached=False)
    except KeyboardInterrupt:
        console.print("stopping...")
    finally:
        stop_pids([c.pid for c in running.values()])


@app.command()
def beat(
    schedule: Annotated[Path | None, typer.Option(help="Celery beat's schedule file (default: data_dir).")] = None,
    loglevel: Annotated[str, typer.Option(help="Log level.")] = "INFO",
) -> None:
    """Run Celery beat behind the database's lock, in the foreground (compose/Kubernetes): of several started, one
    schedules and the others wait for the lock (`strokewatch run` starts beat inside its worker instead)."""
    from integration.entrypoints.beat import main

    _settings()
    _logging(loglevel)
    raise typer.Exit(main(schedule, loglevel))


@app.command()
def scp() -> None:
    """Run the DICOM C-STORE SCP alone, in the foreground (compose/Kubernetes; `run` starts it itself when
    STROKEWATCH_SCP__ENABLED). Pushed studies are queued for the workers, which must share STROKEWATCH_DATA_DIR."""
    from integration.entrypoints.scp import main

    _settings()  # a configuration error is said plainly before anything starts
    raise typer.Exit(main())


@app.command()
def stop(
    data_dir: Annotated[Path, typer.Option(help="The engine's data directory.")] = Path("var/demo"),
    state_dir: Annotated[Path, typer.Option(help="Where the sandbox keeps its state.")] = SANDBOX_DIR,
) -> None:
    """Stop a background engine started by `demo`, and the sandbox."""
    from integration.entrypoints.processes import stop_engine

    console.print("engine stopped" if stop_engine(data_dir) else "no background engine recorded")
    _tool("sandbox.cli", "strokewatch sandbox").main(["down", "--state-dir", str(state_dir)])


@app.command()
def status() -> None:
    """Counts of studies, patients, assessments and open failures from the database."""
    from datetime import UTC

    from integration.adapters.db import queries
    from integration.bootstrap import build_store
    from integration.domain.checks import short_error
    from integration.domain.redact import redact_text, redact_url

    settings = _settings()
    database = redact_url(settings.db_url)  # a password in either URL is shown as ***
    console.print(f"database: {database}\nbroker:   {redact_url(settings.celery_broker_url)}")
    try:
        store = build_store(settings)
        counts = store.counts()
        failures = queries.open_failure_summary(store.sessions)
    except Exception as exc:  # the driver's message, never a traceback with the URL in it
        console.print(f"[red]cannot read the database[/red] {database}: {redact_text(short_error(exc))}\n"
                      "check STROKEWATCH_DATABASE_URL (unset: SQLite under STROKEWATCH_DATA_DIR) and that the "
                      "server is up; `strokewatch doctor` checks every peer")
        raise typer.Exit(1) from None
    table = Table("what", "status", "count", title="StrokeWatch")
    for what, by_status in counts.items():
        for st, n in sorted(by_status.items()):
            table.add_row(what, st, str(n))
    console.print(table)
    if failures:  # one row per open problem; a repeat counts, it does not add a row
        seen = Table("stage", "outcome", "problems", "occurrences", "last seen", title="Open failures")
        for f in failures:
            last = f.last_seen_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ") if f.last_seen_at else "-"
            seen.add_row(f.stage, f.outcome, str(f.rows), str(f.occurrences), last)
        console.print(seen)


@app.command()
def doctor() -> None:
    """Check configuration, database, broker, PACS, EHR and model; say exactly what is wrong."""
    from integration.bootstrap import open_probes
    from integration.services.doctor import run_checks

    settings = _settings()
    results = run_checks(settings, open_probes)
    table = Table("check", "ok", "detail")
    for r in results:
        warning = getattr(r, "warning", False)
        detail = r.detail + (f"\n[yellow]fix: {r.hint}[/yellow]" if ((not r.ok or warning) and r.hint) else "")
        mark = "[red]FAIL[/red]" if not r.ok else ("[yellow]warn[/yellow]" if warning else "[green]ok[/green]")
        table.add_row(r.name, mark, detail)
    console.print(table)
    if not all(r.ok for r in results):
        raise typer.Exit(1)


@app.command()
def assess(patient: Annotated[str, typer.Option("--patient", help="FHIR Patient id.")]) -> None:
    """One-off: sync the patient's vitals, score and publish now, in this process."""
    from integration.bootstrap import bootstrap
    from integration.services.assess import assess_patients, publish
    from integration.services.vitals import sync_vitals

    _logging()
    engine = bootstrap(_settings())
    try:
        svc = engine.services
        if svc.store.get_patient(patient) is None:
            info = engine.ehr.search("Patient", {"_id": patient})
            if not info:
                console.print(f"[red]no Patient/{patient} in the EHR[/red]")
                raise typer.Exit(1)
            svc.store.upsert_patient(patient, info[0].get("birthDate"), info[0].get("gender"))
        sync_vitals(svc, patient)
        svc.store.mark_needs_assessment(patient)
        results = assess_patients(svc, [patient])
        for r in results:
            if r.identifier:
                state = publish(svc, r.identifier)
                row = svc.store.get_assessment(r.identifier)
                console.print(
                    f"{patient}: p={row.probability:.3f} band={row.band} -> {state} RiskAssessment/{row.fhir_id or '-'}"
                )
            else:
                console.print(f"[yellow]{patient}: {r.status}: {r.reason}[/yellow]")
                raise typer.Exit(1)
    finally:
        engine.close()


@app.command()
def republish(
    identifier: Annotated[str, typer.Argument(help="The assessment's identifier (GET /patients/{id}).")],
) -> None:
    """Operator replay: write a failed (or given-up) assessment to the EHR again, now, in this process.
    Idempotent: a RiskAssessment already written with this identifier is found, not duplicated."""
    from integration.bootstrap import bootstrap
    from integration.services.assess import publish
    from integration.services.assess import republish as requeue

    _logging()
    engine = bootstrap(_settings())
    try:
        svc = engine.services
        if not requeue(svc, identifier):
            why = "is being published now" if svc.store.get_assessment(identifier) else "is not known"
            console.print(f"[red]the assessment {identifier} {why}[/red]")
            raise typer.Exit(1)
        state = publish(svc, identifier)
        row = svc.store.get_assessment(identifier)
        assert row is not None
        detail = f"RiskAssessment/{row.fhir_id}" if row.fhir_id else f"{row.outcome}: {row.reason}"
        console.print(f"{identifier}: {state} {detail}")
        if state != "published":
            raise typer.Exit(1)
    finally:
        engine.close()


# ---------------------------------------------------------------------------------------------
# deid: the de-identified research export
# ---------------------------------------------------------------------------------------------
@deid_app.command("export")
def deid_export(
    out: Annotated[Path, typer.Option("--out", help="New directory for the export (never overwritten); written "
                                                    "aside and renamed into place when complete.")],
    patients_from: Annotated[Path | None, typer.Option(
        "--patients-from", help="File of patients, one a line: Patient/<FHIR id>, system|value (an identifier such "
                                "as an MRN), or a bare identifier value; # starts a comment.")] = None,
    all_assessed: Annotated[bool, typer.Option(
        "--all-assessed", help="Every patient the engine has scored (any assessment in its database).")] = False,
) -> None:
    """Export patients' CT/MR series (DICOM PS3.15 Annex E Basic Profile, Retain Longitudinal Temporal Information
    with Modified Dates and Retain Patient Characteristics options) and their Patient, vital-sign Observations and
    RiskAssessments (FHIR NDJSON), pseudonymised with the site key STROKEWATCH_PRIVACY__DEID_KEY, plus a manifest.
    The same patient has one pseudonym in DICOM (PatientID) and FHIR (Patient.id); the same key gives the same
    pseudonyms, UIDs and date shifts in every run."""
    import json

    from integration.bootstrap import open_deid_export
    from integration.domain.types import DomainError
    from integration.services.deid import export, parse_selection

    if (patients_from is None) == (not all_assessed):
        console.print("[red]choose the patients: --patients-from FILE or --all-assessed (one of them)[/red]")
        raise typer.Exit(2)
    _logging()
    settings = _settings()
    try:
        selection = None
        if patients_from is not None:
            selection = parse_selection(patients_from.read_text(encoding="utf-8").splitlines())
        with open_deid_export(settings, out) as (sources, target):
            report = export(sources, target, selection)
    except (ValueError, OSError, DomainError) as err:  # the key, the output, a peer: said plainly, no traceback
        console.print(f"[red]export failed, nothing written:[/red] {getattr(err, 'message', None) or err}")
        raise typer.Exit(1) from None
    typer.echo(json.dumps({"out": report.path, "key_id": report.key_id, "patients": report.patients,
                           "studies": report.studies, "series": report.series, "instances": report.instances,
                           "resources": report.resources, "skipped": len(report.skipped)}, indent=2))


# ---------------------------------------------------------------------------------------------
# training-set: what a federated client of this site trains on
# ---------------------------------------------------------------------------------------------
@training_app.command("export")
def training_set_export(
    outcomes: Annotated[Path, typer.Option(
        "--outcomes", help="The site's outcomes, one patient a line: <patient>,<0|1>; <patient> is Patient/<FHIR id>, "
                           "system|value (an identifier such as an MRN) or a bare identifier value; # comments.")],
    out: Annotated[Path, typer.Option("--out", help="The .npz file to write (never overwritten).")],
) -> None:
    """Write the model inputs the engine builds for these patients (the latest ready study's volume tensor, the
    window's vital signs, age and sex: what it scores) with their outcomes, as the file
    `.venv-federated/bin/strokewatch federated client --data FILE` trains on. No identifier, date or UID in it."""
    import json
    import os
    import tempfile

    import numpy as np

    from integration.bootstrap import bootstrap
    from integration.domain.types import DomainError
    from integration.services.training_set import parse_outcomes, training_set

    if out.exists():
        console.print(f"[red]{out} exists: choose a new file[/red]")
        raise typer.Exit(2)
    try:
        rows = parse_outcomes(outcomes.read_text(encoding="utf-8").splitlines())
    except (ValueError, OSError) as err:
        console.print(f"[red]{outcomes}: {err}[/red]")
        raise typer.Exit(2) from None
    _logging()
    engine = bootstrap(_settings(), migrate=False)
    try:
        arrays, report = training_set(engine.services, rows)
    except DomainError as err:
        console.print(f"[red]nothing written:[/red] {err.message}")
        raise typer.Exit(1) from None
    finally:
        engine.close()
    fd, tmp = tempfile.mkstemp(prefix=".training-set-", suffix=".npz", dir=out.parent.resolve())
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.link(tmp, out)  # complete or absent, and never over a file that appeared meanwhile (FileExistsError)
    except OSError as err:
        console.print(f"[red]nothing written:[/red] {out}: {err.strerror or err}")
        raise typer.Exit(1) from None
    finally:
        os.unlink(tmp)
    typer.echo(json.dumps({"out": str(out), "patients": report.patients, "events": report.events,
                           "skipped": report.skipped}, indent=2))


# ---------------------------------------------------------------------------------------------
# keys: SMART Backend Services
# ---------------------------------------------------------------------------------------------
@keys_app.command("generate")
def keys_generate(
    alg: Annotated[str, typer.Option("--alg", help="RS384 (RSA 3072) or ES384 (P-384).")] = "ES384",
    out: Annotated[Path, typer.Option("--out", help="Directory for private-key.pem (0600) and jwks.json.")] = Path(
        "var/keys"
    ),
    passphrase_file: Annotated[
        Path | None, typer.Option("--passphrase-file", help="Encrypt the private key with the passphrase in this file.")
    ] = None,
) -> None:
    """Make a key pair for SMART Backend Services: the private key for the engine, the JWKS for the EHR."""
    from integration.adapters.smart import parse_alg, write_key_pair

    try:
        passphrase = _passphrase(passphrase_file)
        private, public = write_key_pair(out, parse_alg(alg), passphrase)
    except (ValueError, OSError) as err:
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(1) from None
    console.print(
        f"private key: {private} (0600; set STROKEWATCH_EHR__AUTH__PRIVATE_KEY_FILE to it"
        + (", and STROKEWATCH_EHR__AUTH__PRIVATE_KEY_PASSPHRASE_FILE to the passphrase file)" if passphrase else ")")
        + f"\npublic JWKS: {public} (register it for your client id at the EHR)"
    )


@keys_app.command("jwks")
def keys_jwks(
    key: Annotated[Path, typer.Option("--key", help="The PEM private key (e.g. from `keys generate`).")],
    kid: Annotated[str | None, typer.Option("--kid", help="Key id (default: the key's RFC 7638 thumbprint).")] = None,
    passphrase_file: Annotated[
        Path | None, typer.Option("--passphrase-file", help="The passphrase of an encrypted key.")
    ] = None,
) -> None:
    """Print the public JWKS of a private key (kid, alg, use: sig), to register at the EHR."""
    import json

    from integration.adapters.smart import jwks, key_alg, load_private_key

    try:
        private = load_private_key(key, _passphrase(passphrase_file), setting="--key")
    except ValueError as err:
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(1) from None
    typer.echo(json.dumps(jwks(private, key_alg(private), kid), indent=2))


def _passphrase(path: Path | None) -> str | None:
    from integration.config import read_secret_file

    return read_secret_file(path, f"--passphrase-file {path}") if path is not None else None


@keys_app.command("api-key")
def keys_api_key(
    name: Annotated[str, typer.Argument(help="Who uses the key (lower case, e.g. dashboard); named in the audit log.")],
    role: Annotated[str, typer.Option("--role", help="read (status, patients, studies, failures, metrics) or "
                                                     "operate (also retry and other changes).")] = "read",
) -> None:
    """Make an API key for a machine client: prints the key once, and the setting that admits it (its hash)."""
    from integration.entrypoints.api.security.keys import new_key, settings_line
    from integration.entrypoints.api.security.policy import Role

    try:
        key = new_key()
        line = settings_line(name, Role(role), key)
    except ValueError as err:  # an unknown role or a name unfit for a variable
        console.print(f"[red]{err}[/red] (role: read or operate)")
        raise typer.Exit(2) from None
    typer.echo(f"API key (shown once; the client sends it as X-API-Key): {key}")
    typer.echo(f"Setting for the engine (the key's SHA-256; add it to its environment or secrets):\n{line}")


# ---------------------------------------------------------------------------------------------
# The sandbox and the model's life cycle are tools beside the product, not part of it: these commands hand
# their arguments to the tool's own typed CLI, imported by name only when called (the engine never imports
# them; a production install may not have them).
# ---------------------------------------------------------------------------------------------
def _tool(module: str, what: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        console.print(f"[red]`{what}` is not available in this installation[/red] ({err}); it ships with the "
                      "source checkout: run ./deploy/local/setup.sh")
        raise typer.Exit(2) from err


@app.command("sandbox", context_settings=_PASS_THROUGH)
def sandbox(ctx: typer.Context) -> None:
    """A local sandbox PACS (Orthanc) and FHIR R4 server on 127.0.0.1: up [--triton] | down | status."""
    _tool("sandbox.cli", "strokewatch sandbox").main(list(ctx.args))


@app.command("demo", context_settings=_PASS_THROUGH)
def demo(ctx: typer.Context) -> None:
    """Sandbox PACS + EHR, a demo cohort, the engine detecting and scoring it by itself, and a summary."""
    _tool("sandbox.cli", "strokewatch demo").main(["demo", *ctx.args], prog_name="strokewatch")


# model: each command hands its arguments to the module's own typed CLI (`python -m modelling.<x> --help`)

#: Top-level imports of the model's life cycle: the modelling package and its `.[model]` extra. The engine
#: installs without them, so one missing means "install the model extra", not a bug.
_MODEL_PACKAGES = frozenset(
    {"modelling", "synth", "torch", "onnx", "onnxscript", "nilearn", "nibabel", "captum", "matplotlib", "sklearn"}
)


def _delegate(module: str, ctx: typer.Context) -> None:
    import importlib

    _logging("INFO")
    try:
        entry = importlib.import_module(f"modelling.{module}")
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] not in _MODEL_PACKAGES:
            raise
        console.print(
            f"[red]`strokewatch model {module}` needs the modelling package and its dependencies[/red] "
            f"(missing: {err.name}); from a source checkout: pip install -e '.\\[model]'"
        )
        raise typer.Exit(2) from err
    entry.main(list(ctx.args))


@model_app.command("train", context_settings=_PASS_THROUGH)
def model_train(ctx: typer.Context) -> None:
    """Train the fusion model and the single-modality baselines (options: `strokewatch model train --help`)."""
    _delegate("train", ctx)


@model_app.command("evaluate", context_settings=_PASS_THROUGH)
def model_evaluate(ctx: typer.Context) -> None:
    """Evaluate on a fresh cohort from any seed: --seed S --n N --json --report DIR."""
    _delegate("evaluate", ctx)


@model_app.command("export", context_settings=_PASS_THROUGH)
def model_export(ctx: typer.Context) -> None:
    """Export trained weights to triton_models/stroke_fusion/1/model.onnx and regenerate config.pbtxt."""
    _delegate("export", ctx)


@model_app.command("recalibrate", context_settings=_PASS_THROUGH)
def model_recalibrate(ctx: typer.Context) -> None:
    """Fit a site's temperature and intercept on its synthetic patients into site_calibration.json: --site NAME."""
    _delegate("recalibrate", ctx)


@model_app.command("explain", context_settings=_PASS_THROUGH)
def model_explain(ctx: typer.Context) -> None:
    """Explain one synthetic patient's score: top drivers and an image heat-map overlay."""
    _delegate("explain", ctx)


# federated: Flower and Opacus pin versions below the engine's, so they live in their own venv (.venv-federated)
@app.command("federated", context_settings=_PASS_THROUGH)
def federated(ctx: typer.Context) -> None:
    """Learning across sites (Flower, Opacus): server | client | simulate; runs in .venv-federated."""
    import importlib.util

    missing = [m for m in ("flwr", "opacus", "torch") if importlib.util.find_spec(m) is None]
    if missing:
        console.print(
            f"[red]`strokewatch federated` needs {', '.join(missing)}, which are not in this venv[/red]: Flower pins "
            "versions below the engine's, so it has its own. Run [bold].venv-federated/bin/strokewatch federated "
            f"{' '.join(ctx.args) or '...'}[/bold] (create it with deploy/local/setup.sh --federated)."
        )
        raise typer.Exit(2)
    _tool("modelling.federated.cli", "strokewatch federated").main(list(ctx.args))


if __name__ == "__main__":
    app()
