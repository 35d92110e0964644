"""AudioCache: a bounded TTS cache on the RAM disk, shared by every process of this user.

``cache_key(text, voice=..., engine=..., **options)`` names an utterance;
``AudioCache(name)`` is a directory of complete entry files (0600, in a 0700
directory per cache name and user inside our RAM dir) that every process
opening the same name shares. ``get(key)`` returns a :class:`CachedAudio`
pinned while held; ``get_or_render(key, render, ...)`` renders a missing key
once, whatever the number of callers in this and other processes.

The index is the directory itself, files and atomic renames (see the README,
"A TTS cache", for why not SQLite):

* ``<key>.wav`` (or ``<key>.<suffix>`` for encoded audio) is a committed entry:
  it only ever appears complete, by ``rename``. Its mtime is when it was
  stored (the TTL clock), its atime when it was last used or stored (the LRU clock).
* A holder of an entry keeps a shared flock on it (the pin); evicting takes
  the exclusive flock without waiting and unlinks under it, so a pinned entry
  is never removed, by any process.
* ``<key>.live`` is the entry being rendered: a WAV that a :class:`WavWriter`
  fills, whose header is valid after every chunk. The renderer holds an
  exclusive flock on it; waiters block on a shared flock, which the kernel
  grants when the renderer finished, failed or died.
* ``lock`` serialises what changes the set of entries (commit, eviction,
  discard, clear): the RAM tier never holds more than ``max_bytes`` of
  committed entries, checked and made true under it, before a rename.
* ``stats`` holds the shared counters; ``.<key>.<24 hex digits>.part`` files are in
  flight, ``.<key>.<24 hex digits>.unstored.<suffix>`` is audio too large to store.
  Every sweep and :meth:`AudioCache.destroy` remove only regular files of exactly
  these shapes (a ``.live`` file also starts as a render's WAV, a note as a note):
  whatever else is in the directory is not the cache's, and stays.
* ``<key>.outcome`` is the note a failed (or unstored) render leaves for its
  waiters, naming its file by inode number; the key's next render removes it
  before it starts (a disk may reuse the number), a sweep after a minute,
  :meth:`AudioCache.destroy` at once.

A kill -9 at any point leaves committed entries complete and at most in-flight
files (partials, a stale ``.live``), which the next pass under the lock removes.

The package, one job per module: ``_keys`` names utterances, ``_files`` knows the
directory's file shapes and opens them carefully, ``_tier`` is a directory with its lock
and counters, ``_entry`` is what a look-up returns, ``_render_writer`` the writer a render
streams into, and ``_audio_cache`` the policy over them all.
"""

from __future__ import annotations

from luna_shm.cache._audio_cache import AudioCache, RenderError
from luna_shm.cache._entry import CachedAudio, CacheStats
from luna_shm.cache._keys import cache_key

__all__ = ["AudioCache", "CacheStats", "CachedAudio", "RenderError", "cache_key"]

# The public classes say where users import them from (reprs, tracebacks, pickles).
for _public in (AudioCache, CacheStats, CachedAudio, RenderError, cache_key):
    _public.__module__ = __name__
del _public
