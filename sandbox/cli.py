"""The sandbox's commands: `strokewatch sandbox up|down|status` and `strokewatch demo` hand their arguments here.

Also runnable on its own: `python -m sandbox.cli up`, `python -m sandbox.cli demo`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from sandbox.demo import DEMO_PATIENTS, DEMO_SEED

app = typer.Typer(help="A local sandbox PACS (Orthanc) and FHIR R4 server on 127.0.0.1.", no_args_is_help=True)
console = Console()

SANDBOX_DIR = Path(os.environ.get("STROKEWATCH_SANDBOX_DIR", "var/sandbox"))
StateDir = Annotated[Path, typer.Option(help="Where the sandbox keeps its state and data.")]


@app.command("up")
def up(
    state_dir: StateDir = SANDBOX_DIR,
    triton: Annotated[bool, typer.Option(help="Also start a local Triton server.")] = False,
) -> None:
    """Start Orthanc (+DICOMweb) and the FHIR sandbox in the background."""
    from sandbox.state import start_detached

    with console.status("Starting Orthanc and the FHIR sandbox..."):
        info = start_detached(state_dir)
    console.print(
        f"PACS  (Orthanc) : {info.orthanc_url}   DICOMweb: {info.dicomweb_url}   "
        f"DIMSE: {info.orthanc_aet}@127.0.0.1:{info.orthanc_dicom_port}"
    )
    console.print(f"EHR   (FHIR R4) : {info.fhir_base_url}")
    if triton:
        from sandbox.triton import start_detached as start_triton

        with console.status("Starting Triton..."):
            url = start_triton(state_dir)
        console.print(f"Triton          : {url}   (export STROKEWATCH_TRITON_URL={url})")


@app.command("down")
def down(state_dir: StateDir = SANDBOX_DIR) -> None:
    """Stop the sandbox peers (and a sandbox Triton)."""
    from sandbox.state import stop
    from sandbox.triton import stop_detached as stop_triton

    stop_triton(state_dir)
    console.print("sandbox stopped" if stop(state_dir) else "no sandbox was running")


@app.command("status")
def status(state_dir: StateDir = SANDBOX_DIR) -> None:
    """Is the sandbox running, and where?"""
    from sandbox.state import status as sandbox_status

    st = sandbox_status(state_dir)
    if st is None:
        console.print("no sandbox recorded")
        raise typer.Exit(1)
    console.print(f"Orthanc {st.info.orthanc_url}: {'up' if st.orthanc_running else 'DOWN'}")
    console.print(f"FHIR    {st.info.fhir_base_url}: {'up' if st.fhir_running else 'DOWN'}")
    if not st.healthy:
        raise typer.Exit(1)


@app.command("demo")
def demo(
    patients: Annotated[int, typer.Option(help="How many synthetic patients to load.")] = DEMO_PATIENTS,
    seed: Annotated[int, typer.Option(help="Cohort seed.")] = DEMO_SEED,
    data_dir: Annotated[Path, typer.Option(help="The demo engine's data directory (recreated).")] = Path("var/demo"),
    timeout: Annotated[float, typer.Option(help="Seconds to wait for all assessments.")] = 600,
    keep_running: Annotated[bool, typer.Option(help="Leave the API + worker running afterwards.")] = True,
    state_dir: StateDir = SANDBOX_DIR,
) -> None:
    """Sandbox PACS + EHR, a demo cohort, the engine detecting and scoring it by itself, and a summary."""
    from sandbox.demo import run_demo

    logging.basicConfig(level="WARNING", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    code = run_demo(console, patients=patients, seed=seed, data_dir=data_dir, sandbox_dir=state_dir,
                    timeout=timeout, keep_running=keep_running)
    raise typer.Exit(code)


def main(argv: list[str], prog_name: str = "strokewatch sandbox") -> None:
    """Run one command with ``argv`` (as `strokewatch sandbox ...` / `strokewatch demo ...` hand them over)."""
    app(args=argv, prog_name=prog_name)


if __name__ == "__main__":
    app()
