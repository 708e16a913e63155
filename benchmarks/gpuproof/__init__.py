"""Proof on a real GPU: gpushare itself packs four vLLM servers onto one card.

    python benchmarks/gpu_proof.py --out DIR --model /tmp/model        # a GPU machine, as root
    python benchmarks/gpu_proof.py --out DIR --dry-run                  # CPU: stand-ins throughout
    python benchmarks/gpu_proof.py --out DIR --merge A.json B.json      # join runs' phases
    python benchmarks/gpu_proof.py --out DIR --plot DIR/gpu-proof.json  # redraw the picture

Four annotated InferenceServices (10, 16, 20 and 24 GiB) go through the simulated cluster of
``gpushare simulate`` (:class:`gpushare.simulator.cluster.Simulation`) with one node on this card:
the webhook, the extender and the device plugin run as ``gpushare`` processes (the plugin with real
NVML and its real MPS isolation: a control daemon per container in ``mps``, one per node in
``mps-shared``); the simulator's API server sends the webhook its AdmissionReviews, its
kube-scheduler client calls the extender, its kubelet asks the plugin for a preference and an
allocation over the real gRPC sockets. Each vLLM server then starts as kubelet starts its
container: its command and args with ``$(VAR)`` expanded from Allocate's environment by kubelet's
rules, that environment set (``NVIDIA_VISIBLE_DEVICES`` applied as the container toolkit does, by
``CUDA_VISIBLE_DEVICES``), the MPS pipe directory shared; its processes get the cgroup lines a
container would have where the plugin reads them (``--proc-root``). Every server runs on this
host, so each pod's args name its own port.

Phases (``--phases``): ``alone`` (one server, isolation ``none``: the whole card, no MPS), ``mps``
(the four, refusals, watchdog, exporter, latency beside idle and busy neighbours) and
``mps-shared`` (the four and the latency again), ``sequential`` (the four one after another,
figures and throughput only), ``concurrent[-none|-shared]-N`` (the four started at once) and
``share`` (a busy neighbour with and without a compute share). Results go to
``DIR/gpu-proof.json`` after every step (a run cut short still leaves its figures) and
``DIR/gpu-proof.png`` at the end.

Modules: :mod:`.common` (options, results, one server), :mod:`.stack` (the simulated cluster's
node on the card), :mod:`.measure` (what is measured of running servers), :mod:`.phases`,
:mod:`.report` (summary, picture, merge) and :mod:`.__main__` (the command line).
"""
