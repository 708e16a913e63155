"""The kube-scheduler extender: filter, prioritize and bind pods that ask for GPU memory.

``gpushare scheduler`` (:mod:`.main`) serves kube-scheduler's extender protocol (:mod:`.wire`) over
HTTP (:mod:`.server`), keeps the per-card ledger (:mod:`.ledger`) in step with the cluster
(:mod:`.watching`), and binds each pod with its card in the Binding's annotations (:mod:`.binding`).
"""
