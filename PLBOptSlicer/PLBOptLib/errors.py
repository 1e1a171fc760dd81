"""The one exception type the module shows to users in an error dialog."""


class PLBOptSlicerError(Exception):
    """A problem the user can fix in the scene or the working folder (message says what and where)."""
