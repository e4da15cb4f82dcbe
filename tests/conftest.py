from pathlib import Path

pytest_plugins = ["tests.conftest_peers", "tests.conftest_triton"]

#: Learning across sites needs Flower and Opacus, which live in their own venv (.venv-federated): its tests are
#: collected only by the run that asks for them (deploy/local/test.sh runs both; both exit codes count).
FEDERATED_TESTS = Path(__file__).parent / "federated"


def pytest_addoption(parser):  # type: ignore[no-untyped-def]
    parser.addoption(
        "--federated",
        action="store_true",
        help="collect tests/federated (run with .venv-federated/bin/python; the main run leaves them out)",
    )


def pytest_ignore_collect(collection_path, config):  # type: ignore[no-untyped-def]
    inside = collection_path == FEDERATED_TESTS or FEDERATED_TESTS in collection_path.parents
    if inside and not config.getoption("--federated"):
        return True
    return None
