"""The base of every error a user fixes (bad config, data, model choice): the CLI prints the message
without a traceback. Anything else is a bug and keeps its traceback."""


class UserError(Exception):
    """An error whose message tells the user what to change."""
