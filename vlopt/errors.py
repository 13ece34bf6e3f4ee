"""The one error type a user can cause. The CLI prints its message and exits 2, without a traceback."""


class VloptError(Exception):
    """A problem with the user's input; the message says what to change."""
