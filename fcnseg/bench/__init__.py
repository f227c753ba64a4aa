"""Measuring fcnseg: training and inference speed, the data pipeline, metric accumulation.

One module per measurement (``train``, ``infer``, ``slide``, ``data``, ``metrics``,
``convert``), each timing the library's own code: the training step is
``fcnseg.engine.step.TrainStep``, the networks run as ``fcnseg.engine.runtime.Runtime`` makes
them run, the data are read by ``fcnseg.data``'s datasets, transforms and loader. Nothing here
is a second copy of them.

Every measurement follows one protocol (``fcnseg.bench.common``). Untimed warm-up calls come
first (allocator growth, oneDNN/cuDNN algorithm choice, ``torch.compile``); then each timed call
is bracketed by a device synchronisation, so that its time is what the call costs and not how
long its kernels took to be queued. When several variants are compared (fcnseg against the
reference network, one-pass scoring against crops), their calls are interleaved one by one, so
that the load of a shared machine falls on all of them alike.

Results are plain dicts, ready for JSON:

- ``images_per_s``: images per call / median seconds per call;
- ``ms_per_iter``: ``median``, ``p10``, ``p90``, ``min``, ``max`` over the timed calls;
- ``peak_memory_mb`` with ``memory``: ``cuda_max_allocated`` (the CUDA caching allocator's peak
  during the timed calls) or ``peak_rss`` (the process's peak resident set during the timed
  calls; ``peak_rss_since_start`` where the kernel cannot reset it);
- ``flops_per_iter`` and ``tflops``: FLOPs counted once by ``FlopCounterMode`` (forward and
  backward for training), divided by the median time: the achieved, not the peak, rate.

A report is ``{"mode", "settings", "environment", "results", "summary"}``.
"""
