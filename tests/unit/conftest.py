from __future__ import annotations


def pytest_configure(config):
    # Registered here rather than in pyproject.toml: editing that file re-keys the cached venv.
    config.addinivalue_line("markers", "tools: needs the helm and promtool binaries (kubetune dev build; the "
                                       "prometheus package) or the package index (uv), no cluster; excluded "
                                       "from make test-fast")
