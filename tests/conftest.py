pytest_plugins = ["tests.conftest_peers"]
