"""What a client may read of an error: messages with the server's paths taken out.

Errors raised deep in loading name files (the store's directory, the local
cache, a temporary file); an answer must not tell a client where the server
keeps them. :class:`PathScrubber` replaces the store's address with
``<store>`` and any other absolute filesystem path with ``<path>``.

Plain Python.
"""

import os
import re

__all__ = ["PathScrubber"]


# An absolute path: "/" and at least one more component, not part of a URL
# ("s3://b/k", "http://h/p") or of a relative path ("../x/y").
_ABSOLUTE = re.compile(r"(?<![\w:/.>\-])/(?:[\w.+@%-]+/)+[\w.+@%-]*")


class PathScrubber:
    """Scrubs one store's address and every absolute path out of messages.

    Args:
        store: The adapter store as given (a directory or a URL).
    """

    def __init__(self, store: str):
        roots = {store.rstrip("/")}
        if "://" not in store:
            roots |= {os.path.abspath(store), os.path.realpath(store)}
        # Longest first: a prefix must not leave the rest of a longer root behind.
        self._roots = sorted((r for r in roots if len(r) > 1), key=len, reverse=True)

    def __call__(self, message: str) -> str:
        """``message`` without the store's address or any absolute path."""
        for root in self._roots:
            message = message.replace(root, "<store>")
        return _ABSOLUTE.sub("<path>", message)
