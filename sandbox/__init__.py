"""Local sandbox peers on 127.0.0.1: a real Orthanc PACS, a real FHIR R4 server, a CPU Triton.

Used by `strokewatch sandbox up|down|status` and `strokewatch demo` (which hand their arguments to
`sandbox.cli`), the tests and the benchmarks. Not part of the product: the engine never imports it (an
import-linter contract); it learns a running sandbox's URLs from the `engine.env` file it leaves.
"""

from sandbox._process import SandboxError, free_port
from sandbox.fhir import FhirAuth, FhirPeer, fhir_sandbox_dir, require_node_modules
from sandbox.orthanc import OrthancPeer, orthanc_config
from sandbox.state import SandboxInfo, SandboxStatus, start_detached, status, stop

__all__ = [
    "FhirAuth",
    "FhirPeer",
    "OrthancPeer",
    "SandboxError",
    "SandboxInfo",
    "SandboxStatus",
    "fhir_sandbox_dir",
    "free_port",
    "orthanc_config",
    "require_node_modules",
    "start_detached",
    "status",
    "stop",
]
