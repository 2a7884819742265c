"""Scale-out on Ray Serve (``aura serve --replicas N``).

Nothing in this package is imported by a plain ``aura serve``: Ray is an optional extra
(``pip install 'aura-serve[ray]'``) and is imported only inside :mod:`server.cluster.launch` and
the deployment factories. The pipeline itself is the single server's: every model replica builds
the same :class:`server.serving.ChatService` on its own engine, and the ingress serves the same
routes (``server/routes/chat.py``, ``transcriptions.py``) with a service that forwards the job to a
replica chosen by Serve's model multiplexing (the adapter name is the multiplexed model id).
"""
