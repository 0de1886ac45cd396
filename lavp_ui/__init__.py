"""What the pages of the Streamlit app share (the app's UI layer; ``lavp_core`` never imports it).

Pages stay thin: widgets -> a configuration -> one call into ``lavp_core`` -> render. This package lives
outside ``pages/`` because Streamlit treats every file in that folder as a page.

* :mod:`.routing`: every page is drawn through ``app.py``, also on a direct visit to its URL.
* :mod:`.tasks`: background work shared by sessions (proxies, the Rankings page's attacks), the torch
  thread count, the engine warm-up, and :func:`~.tasks.live_area` to show work in progress.
* :mod:`.study_access`: which results database to open, its rows, studies, progress and stored images.
* :mod:`.sidebar`: the shared sidebar, the session's scenario (:func:`~.sidebar.current_config`,
  :func:`~.sidebar.require_scenario`), uploads, the cached model and dataset thumbnails, widget state.
* :mod:`.serving`: one server, many sessions: the session's id and whether it is still there, the job board
  (a cap on concurrent heavy jobs, one per kind per session, jobs of ended sessions stopped) and the limits
  on what a session may ask for.
* :mod:`.files`: the process's private folder (mode 0700, removed at exit) for uploads and scratch databases.
* :mod:`.formatting`: numbers, tables, images, the loss curve and error boxes.

Each module uses only those below it in this list (``routing``, ``serving``, ``files`` and ``formatting``
none of them).
"""
