"""Install the webhook's serving certificate (the self-contained mode; cert-manager is the other).

The Job and the CronJob ``gpushare-webhook-certs`` run this with the gpushare image's Python:

1. Keep the Secret ``gpushare-webhook-tls`` if it holds a pair made for the Service's names that
   stays valid for more than ``--renew-before-days``; otherwise make a new CA and serving pair
   (``gpushare certs``' code) and write the Secret. The webhook's pods mount it (kubelet updates
   the files; the webhook reloads them).
2. Set ``caBundle`` of every webhook in the MutatingWebhookConfiguration and the
   ValidatingWebhookConfiguration ``gpushare-webhook`` to the Secret's CA, plus the CA it replaced
   in this run, so that the apiserver trusts both while the pods move to the new pair.

Running it again changes nothing while the pair is good. Kubernetes API from ``KUBECONFIG``, else
the pod's ServiceAccount.
"""

import argparse
import asyncio
import base64
import datetime
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

from cryptography import x509
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from gpushare.core import names
from gpushare.webhook import certs

logger = logging.getLogger("gpushare.install-certs")

SERVICE: Final = "gpushare-webhook"
SECRET: Final = "gpushare-webhook-tls"
CONFIGURATION: Final = "gpushare-webhook"
WAIT_SECONDS: Final = 300.0
"""How long to wait for the webhook configurations: ``kubectl apply -k`` creates them last."""


def service_names(service: str, namespace: str) -> list[str]:
    """The names the apiserver reaches a Service by (it checks them against the certificate)."""
    return [f"{service}.{namespace}.svc", f"{service}.{namespace}.svc.cluster.local"]


def usable(
    data: dict[str, str] | None, names: Sequence[str], *, renew_before: datetime.timedelta
) -> bool:
    """Whether a Secret's data holds a pair for ``names`` valid for longer than ``renew_before``."""
    if not data or not all(data.get(key) for key in ("ca.crt", "tls.crt", "tls.key")):
        return False
    try:
        ca = x509.load_pem_x509_certificate(base64.b64decode(data["ca.crt"]))
        cert = x509.load_pem_x509_certificate(base64.b64decode(data["tls.crt"]))
        cert.verify_directly_issued_by(ca)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, TypeError, x509.ExtensionNotFound) as exc:
        logger.warning("the Secret's pair is unusable (%s): making a new one", exc)
        return False
    expires = min(ca.not_valid_after_utc, cert.not_valid_after_utc)
    if expires - datetime.datetime.now(datetime.UTC) < renew_before:
        logger.info("the pair expires on %s: renewing it", expires.isoformat())
        return False
    missing = set(names) - set(sans.get_values_for_type(x509.DNSName))
    if missing:
        logger.info("the pair lacks %s: making a new one", ", ".join(sorted(missing)))
        return False
    return True


def secret_body(name: str, pair: certs.Pair) -> client.V1Secret:
    """A ``kubernetes.io/tls`` Secret with the CA beside the pair."""
    encode = {"ca.crt": pair.ca_pem, "tls.crt": pair.cert_pem, "tls.key": pair.key_pem}
    return client.V1Secret(
        api_version="v1",
        kind="Secret",
        metadata=client.V1ObjectMeta(name=name, labels={"app.kubernetes.io/part-of": "gpushare"}),
        type="kubernetes.io/tls",
        data={key: base64.b64encode(value).decode() for key, value in encode.items()},
    )


async def ensure_secret(
    core: client.CoreV1Api,
    *,
    namespace: str,
    name: str,
    names: Sequence[str],
    renew_before: datetime.timedelta,
) -> tuple[str, str | None]:
    """Keep or (re)write the Secret; return its CA and the CA it replaced (base64 PEM)."""
    try:
        secret = await core.read_namespaced_secret(name, namespace)
    except ApiException as exc:
        if exc.status != 404:
            raise
        secret = None
    data = dict(secret.data or {}) if secret is not None else None
    if usable(data, names, renew_before=renew_before):
        assert data is not None
        logger.info("Secret %s/%s holds a good pair: kept", namespace, name)
        return data["ca.crt"], None
    body = secret_body(name, certs.make(list(names)))
    if secret is None:
        await core.create_namespaced_secret(namespace, body)
        logger.info("Secret %s/%s created", namespace, name)
        return body.data["ca.crt"], None
    body.metadata.resource_version = secret.metadata.resource_version
    await core.replace_namespaced_secret(name, namespace, body)
    logger.info("Secret %s/%s renewed", namespace, name)
    old = (data or {}).get("ca.crt")
    return body.data["ca.crt"], old if old and _still_valid(old) else None


def _still_valid(ca_b64: str) -> bool:
    try:
        ca = x509.load_pem_x509_certificate(base64.b64decode(ca_b64))
    except ValueError:
        return False
    return ca.not_valid_after_utc > datetime.datetime.now(datetime.UTC)


def bundle(ca: str, replaced: str | None) -> str:
    """The caBundle: the current CA, and the one it replaced while pods still serve its pair."""
    pems = base64.b64decode(ca)
    if replaced:
        pems += base64.b64decode(replaced)
    return base64.b64encode(pems).decode()


async def _patch_configuration(
    read: Callable[[str], Awaitable[Any]],
    patch: Callable[[str, Any], Awaitable[Any]],
    *,
    kind: str,
    name: str,
    ca_bundle: str,
    wait_seconds: float,
) -> None:
    deadline = asyncio.get_running_loop().time() + wait_seconds
    while True:
        try:
            configuration = await read(name)
            break
        except ApiException as exc:
            if exc.status != 404 or asyncio.get_running_loop().time() > deadline:
                raise
            logger.info("waiting for %s %s", kind, name)
            await asyncio.sleep(2)
    webhooks = configuration.webhooks or []
    if all(webhook.client_config.ca_bundle == ca_bundle for webhook in webhooks):
        logger.info("%s %s trusts the CA already", kind, name)
        return
    body = {
        "webhooks": [{"name": w.name, "clientConfig": {"caBundle": ca_bundle}} for w in webhooks]
    }
    await patch(name, body)
    logger.info("%s %s: caBundle set on %d webhook(s)", kind, name, len(webhooks))


async def install(
    *,
    namespace: str = names.NAMESPACE,
    secret: str = SECRET,
    service: str = SERVICE,
    configuration: str = CONFIGURATION,
    renew_before: datetime.timedelta = datetime.timedelta(days=30),
    wait_seconds: float = WAIT_SECONDS,
) -> None:
    """Keep or write the Secret, then point both webhook configurations at its CA."""
    if os.environ.get("KUBECONFIG"):
        await config.load_kube_config()
    else:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    async with client.ApiClient() as api:
        core = client.CoreV1Api(api)
        admission = client.AdmissionregistrationV1Api(api)
        ca, replaced = await ensure_secret(
            core,
            namespace=namespace,
            name=secret,
            names=service_names(service, namespace),
            renew_before=renew_before,
        )
        ca_bundle = bundle(ca, replaced)
        await _patch_configuration(
            admission.read_mutating_webhook_configuration,
            admission.patch_mutating_webhook_configuration,
            kind="MutatingWebhookConfiguration",
            name=configuration,
            ca_bundle=ca_bundle,
            wait_seconds=wait_seconds,
        )
        await _patch_configuration(
            admission.read_validating_webhook_configuration,
            admission.patch_validating_webhook_configuration,
            kind="ValidatingWebhookConfiguration",
            name=configuration,
            ca_bundle=ca_bundle,
            wait_seconds=wait_seconds,
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--namespace", default=names.NAMESPACE)
    parser.add_argument("--secret", default=SECRET)
    parser.add_argument("--service", default=SERVICE)
    parser.add_argument("--configuration", default=CONFIGURATION)
    parser.add_argument("--renew-before-days", type=int, default=30)
    parser.add_argument("--wait-seconds", type=float, default=WAIT_SECONDS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        asyncio.run(
            install(
                namespace=args.namespace,
                secret=args.secret,
                service=args.service,
                configuration=args.configuration,
                renew_before=datetime.timedelta(days=args.renew_before_days),
                wait_seconds=args.wait_seconds,
            )
        )
    except ApiException as exc:
        logger.error("the apiserver refused: %s %s", exc.status, exc.reason)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
