pytest_plugins = ["tests.conftest_peers", "tests.conftest_triton"]
