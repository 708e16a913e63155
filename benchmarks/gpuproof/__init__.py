"""Proof on a real GPU: gpushare itself packs four vLLM servers onto one card.

    python benchmarks/gpu_proof.py --out DIR --model /tmp/model        # a GPU machine, as root
    python benchmarks/gpu_proof.py --out DIR --dry-run                  # CPU: stand-ins throughout
    python benchmarks/gpu_proof.py --out DIR --merge A.json B.json      # join runs' phases
    python benchmarks/gpu_proof.py --out DIR --plot DIR/gpu-proof.json  # redraw the picture

Four annotated InferenceServices (10, 16, 20 and 24 GiB) go through the real parts, in one process:
the webhook's validation and mutation (its pure core; the patch applied as kube-apiserver applies
it) turn each into a pod; the extender (its HTTP server, ledger and binder, watching an in-memory
API server) places the pod on a ledger fed by the device-plugin agent's node report of this card
(real NVML); kube-scheduler's filter, prioritize and bind calls come from the simulator's client;
kubelet's device manager (the simulator's, over the real gRPC sockets) asks the agent for a
preference and an allocation (the agent runs its real MPS isolation: a control daemon per
container in ``mps``, one per node in ``mps-shared``); each vLLM server starts as kubelet starts
its container: its command and args with ``$(VAR)`` expanded from Allocate's environment by
kubelet's rules, that environment set (``NVIDIA_VISIBLE_DEVICES`` applied as the container
toolkit does, by ``CUDA_VISIBLE_DEVICES``), the MPS pipe directory shared. Every server runs on
this host, so each pod's args name its own port.

Phases (``--phases``): ``alone`` (one server, isolation ``none``: the whole card, no MPS), ``mps``
(the four, refusals, watchdog, exporter, latency beside idle and busy neighbours) and
``mps-shared`` (the four and the latency again). Results go to ``DIR/gpu-proof.json`` after every
step (a run cut short still leaves its figures) and ``DIR/gpu-proof.png`` at the end.

Modules: :mod:`.common` (options, results, one server), :mod:`.stack` (the parts of one node),
:mod:`.measure` (what is measured of running servers), :mod:`.phases`, :mod:`.report` (summary,
picture, merge) and :mod:`.__main__` (the command line).
"""
