"""Local sandbox peers on 127.0.0.1: a real Orthanc PACS and a real FHIR R4 server.

Used by `strokewatch sandbox up|down|status`, the demo and the integration tests. Not part of the
engine's runtime: nothing under integration/ outside entrypoints and tests should import it.
"""

from integration.sandbox._process import SandboxError, free_port
from integration.sandbox.fhir import FhirAuth, FhirPeer, fhir_sandbox_dir, require_node_modules
from integration.sandbox.orthanc import OrthancPeer, orthanc_config
from integration.sandbox.state import SandboxInfo, SandboxStatus, start_detached, status, stop

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
