"""Exceptions of luna_shm beyond the builtin ones it raises."""


class LunaShmError(Exception):
    """Base class of the errors that luna_shm defines itself."""


class WavError(LunaShmError, ValueError):
    """A file is not a WAV file we can read: malformed, truncated or unsupported."""


class HandoffError(LunaShmError, ValueError):
    """A message on a handoff socket is not a WAV handoff (no fd, wrong header)."""


class StreamAbandoned(WavError):
    """A live WAV stream ended without being finished: its writer died or aborted."""
