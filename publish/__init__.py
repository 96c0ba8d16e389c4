"""Publishing bundles: summaries of what a bundle holds, model cards, the Hub client.
Imports only :mod:`mmconvert.formats` and :mod:`mmconvert.errors`."""
