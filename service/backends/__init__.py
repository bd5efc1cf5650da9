"""Training/serving backends behind one interface (see :mod:`service.backends.base`).

Nothing is imported here: the interface (:mod:`~service.backends.base`) and the registry
(:mod:`~service.backends.registry`) load no backend, so importing them does not load boto3; the
backends themselves are put together in :func:`service.state.build_backends`.
"""
