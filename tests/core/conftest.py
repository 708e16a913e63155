"""Settings of the core's tests."""

from hypothesis import settings

# The machine may be busy (a Go build, other suites): judge properties, not speed. Inherit the
# active profile (a --hypothesis-profile given on the command line) and lift only the deadline.
settings.register_profile("gpushare-core", parent=settings.default, deadline=None)
settings.load_profile("gpushare-core")
