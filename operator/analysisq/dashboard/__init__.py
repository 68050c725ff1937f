"""``analysisq dashboard``: a web page and a JSON API over the queue's database.

Reading order: ``app`` builds the aiohttp application; ``errors`` and ``guard`` are its
middleware (errors as pages or JSON; host, cross-site and action checks); ``page`` renders
the HTML, ``api`` serves the JSON the page polls, ``actions`` the POSTs (retry failed, resume
a target, suspend); ``context`` holds what they share. The SQL is in
``analysisq.queue.dashboard``; the operator serves the same app (``analysisq.kube.dashboard``).
"""
