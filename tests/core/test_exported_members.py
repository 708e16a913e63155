"""The package's public surface is pinned: a change here is a change of the product's API."""

import gpushare


def test_the_package_exports_only_its_version() -> None:
    assert gpushare.__all__ == ["__version__"]
    assert all(hasattr(gpushare, name) for name in gpushare.__all__)
    assert isinstance(gpushare.__version__, str)
