"""Validates rendered Kubernetes manifests offline (scripts/validate-deploy.sh).

    validate.py k8s --refs|--no-refs K8S_VERSION SCHEMA_DIR RENDERED.yaml...
    validate.py compose CONFIG.yaml

`k8s`: every core resource against the Kubernetes JSON schemas that
kubernetes-validate bundles (strict: unknown fields fail), every KEDA
ScaledObject and TriggerAuthentication against the openAPIV3Schema of
KEDA's CRDs in SCHEMA_DIR (made strict the same way), then (with --refs,
on rendered files) the references between them (scale target,
authentication, secret keys, AMQP queue names).

`compose`: the output of `docker-compose config`: the services the stack
needs are there, and the worker pools can be scaled (`--scale worker=4`):
no container_name and no published host ports on them.

Exits 1 with one line per problem.
"""

import glob
import os
import re
import sys

import jsonschema
import kubernetes_validate.utils as kv
import yaml

KEDA_GROUP = "keda.sh"


def load_docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def name_of(doc):
    return "%s/%s" % (doc.get("kind"), (doc.get("metadata") or {}).get("name"))


# --- KEDA's CRDs as JSON schema -------------------------------------------


def strict_schema(node):
    """The CRD's structural schema as JSON schema: Kubernetes prunes unknown
    fields silently, so a misspelt field would be lost without a word; here
    it is an error. int-or-string becomes an explicit union."""
    if isinstance(node, list):
        return [strict_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict_schema(v) for k, v in node.items()}
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    preserve = out.pop("x-kubernetes-preserve-unknown-fields", False)
    if (
        out.get("type") == "object"
        and "properties" in out
        and "additionalProperties" not in out
        and not preserve
    ):
        out["additionalProperties"] = False
    for k in list(out):
        if k.startswith("x-kubernetes-"):
            del out[k]
    return out


def crd_schemas(schema_dir):
    """(group/version, kind) -> JSON schema, from every CRD in schema_dir."""
    schemas = {}
    for path in sorted(glob.glob(os.path.join(schema_dir, "*.yaml"))):
        for crd in load_docs(path):
            if crd.get("kind") != "CustomResourceDefinition":
                continue
            spec = crd["spec"]
            for v in spec["versions"]:
                if not v.get("served", False):
                    continue
                schema = strict_schema(v["schema"]["openAPIV3Schema"])
                # metadata is `type: object` in a CRD: the API server checks it.
                schema["properties"]["metadata"] = {
                    "type": "object",
                    "required": ["name"],
                    "properties": {"name": {"type": "string", "minLength": 1}},
                }
                key = ("%s/%s" % (spec["group"], v["name"]), spec["names"]["kind"])
                schemas[key] = schema
    return schemas


def cel_rules(doc):
    """The x-kubernetes-validations (CEL) rules of KEDA's CRDs that a JSON
    schema cannot say, written out by hand."""
    errors = []
    spec = doc.get("spec") or {}
    if doc.get("kind") == "ScaledObject":
        lo, hi = spec.get("minReplicaCount"), spec.get("maxReplicaCount", 100)
        if isinstance(lo, int) and isinstance(hi, int) and lo > hi:
            errors.append("minReplicaCount must be less than or equal to maxReplicaCount")
    return errors


# --- checks ----------------------------------------------------------------


def check_k8s(refs, version, schema_dir, files):
    keda = crd_schemas(schema_dir)
    if not keda:
        return ["no KEDA CRD schema in %s" % schema_dir]
    problems = []
    for path in files:
        docs = load_docs(path)
        where = os.path.basename(path)
        for doc in docs:
            what = "%s: %s" % (where, name_of(doc))
            api = doc.get("apiVersion", "")
            if api.split("/")[0] == KEDA_GROUP:
                schema = keda.get((api, doc.get("kind")))
                if schema is None:
                    problems.append("%s: no KEDA schema for %s" % (what, api))
                    continue
                v = jsonschema.Draft202012Validator(schema)
                for e in sorted(v.iter_errors(doc), key=lambda e: list(e.absolute_path)):
                    at = ".".join(str(p) for p in e.absolute_path) or "(top)"
                    problems.append("%s: %s: %s" % (what, at, e.message))
                problems += ["%s: %s" % (what, m) for m in cel_rules(doc)]
            else:
                try:
                    kv.validate(doc, version, strict=True)
                except kv.ValidationError as e:
                    at = ".".join(str(p) for p in e.absolute_path) or "(top)"
                    problems.append("%s: %s: %s" % (what, at, e.message))
                except kv.SchemaNotFoundError as e:
                    problems.append("%s: %s" % (what, e))
        if refs:
            problems += ["%s: %s" % (where, m) for m in references(docs)]
    return problems


def references(docs):
    """What KEDA and Kairos resolve at run time: the objects a ScaledObject
    names exist in the same render, one ScaledObject per workload (KEDA's
    webhook refuses a second), secret keys exist, and RabbitMQ triggers read
    the management API and name a queue of KAIROS_NAMESPACE."""
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d.get("kind"), {})[(d.get("metadata") or {}).get("name")] = d
    settings = {}
    for cm in by_kind.get("ConfigMap", {}).values():
        settings.update(cm.get("data") or {})
    namespace = settings.get("KAIROS_NAMESPACE", "kairos")
    quorum = settings.get("KAIROS_QUEUE_MODE", "classic") == "quorum"
    problems, targets = [], {}
    for name, so in by_kind.get("ScaledObject", {}).items():
        spec = so.get("spec") or {}
        ref = spec.get("scaleTargetRef") or {}
        kind = ref.get("kind", "Deployment")
        target = ref.get("name")
        if target not in by_kind.get(kind, {}):
            problems.append("ScaledObject/%s: scaleTargetRef %s/%s is not in the render" % (name, kind, target))
        if (kind, target) in targets:
            problems.append(
                "ScaledObject/%s: %s/%s is already scaled by ScaledObject/%s (KEDA allows one)"
                % (name, kind, target, targets[(kind, target)])
            )
        targets[(kind, target)] = name
        for t in spec.get("triggers") or []:
            auth = (t.get("authenticationRef") or {}).get("name")
            if auth and auth not in by_kind.get("TriggerAuthentication", {}):
                problems.append("ScaledObject/%s: authenticationRef %s is not in the render" % (name, auth))
            meta = t.get("metadata") or {}
            if t.get("type") == "rabbitmq":
                if meta.get("protocol") != "http":
                    problems.append(
                        "ScaledObject/%s: rabbitmq trigger needs protocol: http (AMQP mode hides unacked prefetch)"
                        % name
                    )
                queue = str(meta.get("queueName", ""))
                regex = str(meta.get("useRegex", "false")).lower() == "true"
                prefix = ("^" + re.escape(namespace + ".q.")) if regex else namespace + ".q."
                if not queue.startswith(prefix):
                    problems.append(
                        "ScaledObject/%s: queueName %r is not a queue of namespace %r (%s.q.QUEUE%s)"
                        % (name, queue, namespace, namespace, ", as a regex starting with ^" if regex else "")
                    )
                elif quorum and not regex:
                    # A quorum-mode queue of order priority is three queues;
                    # the trigger must count them all.
                    problems.append(
                        "ScaledObject/%s: KAIROS_QUEUE_MODE is quorum, so queue %r has priority bands "
                        "(%s.p4, %s.p7): set useRegex \"true\", operation sum and a queueName matching all three"
                        % (name, queue, queue, queue)
                    )
    secrets = by_kind.get("Secret", {})
    for name, ta in by_kind.get("TriggerAuthentication", {}).items():
        for ref in (ta.get("spec") or {}).get("secretTargetRef") or []:
            secret = secrets.get(ref.get("name"))
            if secret is None:
                continue  # made out of band
            keys = set((secret.get("stringData") or {})) | set((secret.get("data") or {}))
            if ref.get("key") not in keys:
                problems.append(
                    "TriggerAuthentication/%s: Secret %s has no key %s" % (name, ref.get("name"), ref.get("key"))
                )
    return problems


def check_compose(path):
    with open(path) as f:
        services = (yaml.safe_load(f) or {}).get("services") or {}
    problems = []
    for want in ("redis", "rabbitmq", "worker", "worker-heavy"):
        if want not in services:
            problems.append("compose: no service %s" % want)
    schedulers = [s for s in services if s.startswith("scheduler")]
    if len(schedulers) < 2:
        problems.append("compose: %d scheduler services, want 2" % len(schedulers))
    for name, svc in services.items():
        if not name.startswith("worker"):
            continue
        if "container_name" in svc:
            problems.append("compose: %s has container_name: --scale cannot multiply it" % name)
        if svc.get("ports"):
            problems.append("compose: %s publishes host ports: a second replica could not bind them" % name)
    return problems


def main(argv):
    if len(argv) >= 5 and argv[1] == "k8s" and argv[2] in ("--refs", "--no-refs"):
        problems = check_k8s(argv[2] == "--refs", argv[3], argv[4], argv[5:])
    elif len(argv) == 3 and argv[1] == "compose":
        problems = check_compose(argv[2])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    for p in problems:
        print("INVALID %s" % p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
