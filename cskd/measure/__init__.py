"""Measurement: what a deployed model costs, and which student to train for a target.

One module per concept, as timm keeps its layers: :mod:`~cskd.measure.bench` times model packages
against their teacher (``cskd bench``), :mod:`~cskd.measure.served` measures them behind ``cskd
serve`` (``--served``), :mod:`~cskd.measure.loadtest` loads a running server (``cskd bench http``),
:mod:`~cskd.measure.plots` draws what they measure, and :mod:`~cskd.measure.plan` chooses the student
before training (``cskd plan``). This file imports nothing: the load drivers stay free of torch.
"""
