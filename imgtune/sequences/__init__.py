"""What is not a photo, drawn as one: mouse sessions and numeric time series rendered as images.

``windows`` cuts a sequence into overlapping windows, ``mouse`` and ``series`` read a session file
and draw one window (on the primitives of ``canvas``), ``render`` turns a folder of session files into
a class-folder dataset with a manifest, and ``groups`` turns window predictions back into one score
per session.
"""
