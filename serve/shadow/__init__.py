"""The shadow teacher: the served student watched by its teacher on live traffic.

A sampled share of the watched model's images (``--shadow-rate``) goes, after the student has answered,
to one shadow process for the whole server (:mod:`.process`): every worker draws its samples and sends
them over a Unix socket (:mod:`.feed`), the process judges them with the teacher (:mod:`.teachers`: here,
or at ``--shadow-url``), compares the two by label over a sliding window (:mod:`.judge`) and writes the
disagreements as a transfer set (:mod:`.capture`). ``GET /v1/shadow`` and the ``cskd_shadow_*`` metrics
answer from the process's latest report, the same on every worker.
"""
