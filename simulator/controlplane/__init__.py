"""A real kube-apiserver and kube-scheduler for ``gpushare simulate --control-plane real`` (and the
tests): built binaries found (:mod:`.binaries`), certificates (:mod:`.pki`), processes
(:mod:`.launch`) and the control plane itself (:mod:`.server`)."""
