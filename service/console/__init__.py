"""The web console at ``/ui``: one static page, one script, one stylesheet, talking only to the JSON API."""
