#!/usr/bin/env python3
"""check-k8s.py — checks Kubernetes manifests for what an API server (or
the kubelet) would reject, without a cluster: every YAML document parses;
apiVersion/kind is a known pair; names are DNS-1123; no unknown fields in
the objects we use (kubectl's default strict field validation refuses
them); containers have a name and an image; ports are integers 1..65535
and named ports are IANA_SVC_NAMEs that exist; probes and lifecycle
handlers have exactly one well-formed handler; resource quantities parse
and requests do not exceed limits; env entries are valid; Deployment
selectors match their template labels; Service and PodDisruptionBudget
selectors select a pod template of the same files; ConfigMap and Secret
references name something that exists (a Secret may be left out of the
files on purpose: those are listed as notes).

With --idemgate BIN, each idemgate container's config (the ConfigMap entry
its -c path points at, through the volume mount) is written to a temporary
file and checked with `BIN -t -c FILE`; and the pod's
terminationGracePeriodSeconds must cover the container's preStop sleep
plus the config's limits.shutdown_grace_ms, and the probes must use the
admin.listen port, the container ports the listen port.

usage: check-k8s.py [--idemgate BIN] FILE.yaml...      exit 1 on any error
"""
import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile

import yaml

KINDS = {
    ("v1", "ConfigMap"), ("v1", "Secret"), ("v1", "Service"), ("v1", "Pod"),
    ("v1", "ServiceAccount"), ("apps/v1", "Deployment"), ("apps/v1", "StatefulSet"),
    ("apps/v1", "DaemonSet"), ("policy/v1", "PodDisruptionBudget"),
    ("autoscaling/v2", "HorizontalPodAutoscaler"), ("networking.k8s.io/v1", "NetworkPolicy"),
}

DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# IANA_SVC_NAME: at most 15, lower-case alphanumerics and '-', a letter at
# least, no leading/trailing/double '-'.
SVC_NAME = re.compile(r"^(?=.*[a-z])[a-z0-9]+(-[a-z0-9]+)*$")
ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
LABEL_NAME = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                        r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
QUANTITY = re.compile(r"^([+-]?[0-9.]+)([eE][+-]?[0-9]+|Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?$")
SUFFIX = {None: 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50,
          "Ei": 2**60, "n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9,
          "T": 1e12, "P": 1e15, "E": 1e18}

# Fields accepted per object type (the subset of the API these examples
# may use; anything else is a typo until added here on purpose).
F_META = {"name", "namespace", "labels", "annotations", "generateName"}
F_TOP = {"apiVersion", "kind", "metadata", "spec", "data", "stringData", "binaryData",
         "type", "immutable"}
F_DEPLOY_SPEC = {"replicas", "selector", "template", "strategy", "minReadySeconds",
                 "revisionHistoryLimit", "progressDeadlineSeconds", "paused"}
F_STRATEGY = {"type", "rollingUpdate"}
F_ROLLING = {"maxUnavailable", "maxSurge"}
F_TEMPLATE = {"metadata", "spec"}
F_POD_SPEC = {"containers", "initContainers", "volumes", "terminationGracePeriodSeconds",
              "serviceAccountName", "securityContext", "affinity", "nodeSelector",
              "tolerations", "topologySpreadConstraints", "priorityClassName",
              "automountServiceAccountToken", "enableServiceLinks", "restartPolicy",
              "dnsPolicy", "imagePullSecrets", "shareProcessNamespace"}
F_CONTAINER = {"name", "image", "imagePullPolicy", "command", "args", "env", "envFrom",
               "ports", "livenessProbe", "readinessProbe", "startupProbe", "lifecycle",
               "resources", "securityContext", "volumeMounts", "workingDir",
               "terminationMessagePolicy", "restartPolicy"}
F_PORT = {"name", "containerPort", "protocol", "hostPort", "hostIP"}
F_PROBE = {"httpGet", "tcpSocket", "exec", "grpc", "initialDelaySeconds", "periodSeconds",
           "timeoutSeconds", "failureThreshold", "successThreshold",
           "terminationGracePeriodSeconds"}
F_HANDLER = {"httpGet", "tcpSocket", "exec", "sleep"}
F_HTTPGET = {"path", "port", "host", "scheme", "httpHeaders"}
F_RESOURCES = {"requests", "limits", "claims"}
F_ENV = {"name", "value", "valueFrom"}
F_VALUEFROM = {"secretKeyRef", "configMapKeyRef", "fieldRef", "resourceFieldRef"}
F_KEYREF = {"name", "key", "optional"}
F_MOUNT = {"name", "mountPath", "readOnly", "subPath", "subPathExpr", "mountPropagation"}
F_VOLUME = {"name", "configMap", "secret", "emptyDir", "projected", "persistentVolumeClaim",
            "hostPath"}
F_EMPTYDIR = {"medium", "sizeLimit"}
F_PVC_SOURCE = {"claimName", "readOnly"}
F_HOSTPATH = {"path", "type"}
# Volume sources a container can write to (an LMDB directory must be on one).
WRITABLE_VOLUMES = ("emptyDir", "persistentVolumeClaim", "hostPath")
F_SECCTX = {"runAsNonRoot", "runAsUser", "runAsGroup", "allowPrivilegeEscalation",
            "readOnlyRootFilesystem", "capabilities", "privileged", "seccompProfile"}
F_SERVICE_SPEC = {"type", "selector", "ports", "clusterIP", "sessionAffinity",
                  "externalTrafficPolicy", "internalTrafficPolicy", "publishNotReadyAddresses"}
F_SVC_PORT = {"name", "port", "targetPort", "protocol", "nodePort", "appProtocol"}
F_PDB_SPEC = {"minAvailable", "maxUnavailable", "selector", "unhealthyPodEvictionPolicy"}
F_SELECTOR = {"matchLabels", "matchExpressions"}


class Checker:
    def __init__(self):
        self.errors = []
        self.notes = []

    def err(self, where, msg):
        self.errors.append("%s: %s" % (where, msg))

    def fields(self, where, obj, allowed):
        if not isinstance(obj, dict):
            self.err(where, "must be a mapping, not %s" % type(obj).__name__)
            return False
        for k in obj:
            if k not in allowed:
                self.err(where, "unknown field %r" % k)
        return True

    def need(self, where, obj, *keys):
        for k in keys:
            if not isinstance(obj, dict) or obj.get(k) in (None, "", [], {}):
                self.err(where, "%s is required" % k)

    def port_int(self, where, v):
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 65535:
            self.err(where, "port %r must be an integer 1..65535" % (v,))
            return False
        return True

    def port_ref(self, where, v, named):
        """An int-or-string port: an integer in range, or a named port of
        the container."""
        if isinstance(v, str):
            if not SVC_NAME.match(v) or len(v) > 15:
                self.err(where, "port name %r is not an IANA_SVC_NAME" % v)
            elif named is not None and v not in named:
                self.err(where, "port %r names no port of the container (%s)"
                         % (v, ", ".join(sorted(named)) or "none"))
        else:
            self.port_int(where, v)

    def labels(self, where, labels):
        if labels is None:
            return
        if not isinstance(labels, dict):
            self.err(where, "labels must be a mapping")
            return
        for k, v in labels.items():
            if not isinstance(k, str) or not LABEL_NAME.match(k):
                self.err(where, "label key %r is invalid" % (k,))
            if not isinstance(v, str) or len(v) > 63 or not LABEL_VALUE.match(v):
                self.err(where, "label value %r (key %s) must be a string of at most 63 "
                         "alphanumerics, '-', '_', '.'" % (v, k))

    def metadata(self, where, meta):
        if not self.fields(where + ".metadata", meta, F_META):
            return
        name = meta.get("name")
        if not isinstance(name, str) or len(name) > 253 or not DNS1123_SUBDOMAIN.match(name):
            self.err(where, "metadata.name %r is not a DNS-1123 subdomain" % (name,))
        self.labels(where + ".metadata.labels", meta.get("labels"))
        ann = meta.get("annotations") or {}
        for k, v in ann.items():
            if not isinstance(v, str):
                self.err(where, "annotation %s must be a string, not %r" % (k, v))

    def selector(self, where, sel):
        if not self.fields(where, sel, F_SELECTOR):
            return {}
        ml = sel.get("matchLabels") or {}
        if not ml and not sel.get("matchExpressions"):
            self.err(where, "an empty selector selects everything")
        self.labels(where + ".matchLabels", ml)
        return ml


def quantity(v):
    s = str(v)
    m = QUANTITY.match(s)
    if not m:
        return None
    num, suf = m.group(1), m.group(2)
    try:
        x = float(num)
    except ValueError:
        return None
    if suf and suf[0] in "eE":
        return x * 10 ** int(suf[1:])
    return x * SUFFIX[suf]


def handler(c, where, h, allowed_kinds, named):
    """A probe or lifecycle handler: exactly one of allowed_kinds."""
    kinds = [k for k in allowed_kinds if k in h]
    if len(kinds) != 1:
        c.err(where, "needs exactly one handler of %s, has %s" % (sorted(allowed_kinds), kinds))
        return
    kind = kinds[0]
    body = h[kind]
    if kind == "httpGet":
        if c.fields(where + ".httpGet", body, F_HTTPGET):
            c.need(where + ".httpGet", body, "port")
            if "port" in body:
                c.port_ref(where + ".httpGet.port", body["port"], named)
            path = body.get("path", "/")
            if not isinstance(path, str) or not path.startswith("/"):
                c.err(where, "httpGet.path %r must start with /" % (path,))
            if body.get("scheme", "HTTP") not in ("HTTP", "HTTPS"):
                c.err(where, "httpGet.scheme must be HTTP or HTTPS")
    elif kind == "tcpSocket":
        c.need(where + ".tcpSocket", body, "port")
        if isinstance(body, dict) and "port" in body:
            c.port_ref(where + ".tcpSocket.port", body["port"], named)
    elif kind == "exec":
        cmd = body.get("command") if isinstance(body, dict) else None
        if not isinstance(cmd, list) or not cmd or not all(isinstance(a, str) for a in cmd):
            c.err(where, "exec.command must be a non-empty list of strings")
    elif kind == "sleep":
        s = body.get("seconds") if isinstance(body, dict) else None
        if not isinstance(s, int) or s < 0:
            c.err(where, "sleep.seconds must be a non-negative integer")
    elif kind == "grpc":
        c.port_int(where + ".grpc.port", (body or {}).get("port"))


def prestop_seconds(container):
    """What the preStop hook waits, when it is a sleep we can read."""
    pre = ((container.get("lifecycle") or {}).get("preStop")) or {}
    if "sleep" in pre:
        return int(pre["sleep"].get("seconds", 0))
    cmd = (pre.get("exec") or {}).get("command") or []
    if len(cmd) == 2 and os.path.basename(cmd[0]) == "sleep":
        try:
            return int(cmd[1])
        except ValueError:
            return None
    return None if pre else 0


def check_container(c, where, ct, volumes):
    if not c.fields(where, ct, F_CONTAINER):
        return {}
    c.need(where, ct, "name", "image")
    name = ct.get("name", "")
    if not isinstance(name, str) or len(name) > 63 or not DNS1123_LABEL.match(name):
        c.err(where, "container name %r is not a DNS-1123 label" % (name,))
    for k in ("command", "args"):
        if k in ct and (not isinstance(ct[k], list) or not all(isinstance(a, str) for a in ct[k])):
            c.err(where, "%s must be a list of strings" % k)
    named = {}
    seen_ports = set()
    for i, p in enumerate(ct.get("ports") or []):
        pw = "%s.ports[%d]" % (where, i)
        if not c.fields(pw, p, F_PORT):
            continue
        c.need(pw, p, "containerPort")
        if "containerPort" in p and c.port_int(pw + ".containerPort", p["containerPort"]):
            key = (p["containerPort"], p.get("protocol", "TCP"))
            if key in seen_ports:
                c.err(pw, "duplicate containerPort %d/%s" % key)
            seen_ports.add(key)
        if p.get("protocol", "TCP") not in ("TCP", "UDP", "SCTP"):
            c.err(pw, "protocol must be TCP, UDP or SCTP")
        if "name" in p:
            if not isinstance(p["name"], str) or len(p["name"]) > 15 or not SVC_NAME.match(p["name"]):
                c.err(pw, "port name %r is not an IANA_SVC_NAME" % (p["name"],))
            elif p["name"] in named:
                c.err(pw, "duplicate port name %r" % p["name"])
            else:
                named[p["name"]] = p.get("containerPort")
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        if probe in ct:
            pw = "%s.%s" % (where, probe)
            pr = ct[probe]
            if c.fields(pw, pr, F_PROBE):
                handler(c, pw, pr, ("httpGet", "tcpSocket", "exec", "grpc"), named)
                for k in ("initialDelaySeconds", "periodSeconds", "timeoutSeconds",
                          "failureThreshold", "successThreshold"):
                    if k in pr and (not isinstance(pr[k], int) or pr[k] < 0):
                        c.err(pw, "%s must be a non-negative integer" % k)
                if probe != "readinessProbe" and pr.get("successThreshold", 1) != 1:
                    c.err(pw, "successThreshold must be 1 for liveness and startup probes")
    lc = ct.get("lifecycle")
    if lc is not None and c.fields(where + ".lifecycle", lc, {"preStop", "postStart"}):
        for hook, h in lc.items():
            hw = "%s.lifecycle.%s" % (where, hook)
            if c.fields(hw, h, F_HANDLER):
                handler(c, hw, h, ("httpGet", "tcpSocket", "exec", "sleep"), named)
    res = ct.get("resources")
    if res is not None and c.fields(where + ".resources", res, F_RESOURCES):
        vals = {}
        for part in ("requests", "limits"):
            for rname, q in (res.get(part) or {}).items():
                v = quantity(q)
                if v is None or isinstance(q, bool):
                    c.err("%s.resources.%s.%s" % (where, part, rname),
                          "%r is not a resource quantity" % (q,))
                else:
                    vals[(part, rname)] = v
        for (part, rname), v in vals.items():
            lim = vals.get(("limits", rname))
            if part == "requests" and lim is not None and v > lim:
                c.err(where + ".resources", "requests.%s exceeds limits.%s" % (rname, rname))
    env_names = set()
    for i, e in enumerate(ct.get("env") or []):
        ew = "%s.env[%d]" % (where, i)
        if not c.fields(ew, e, F_ENV):
            continue
        n = e.get("name")
        if not isinstance(n, str) or not ENV_NAME.match(n):
            c.err(ew, "env name %r is invalid" % (n,))
        elif n in env_names:
            c.err(ew, "duplicate env name %s" % n)
        env_names.add(n)
        if "value" in e and "valueFrom" in e:
            c.err(ew, "value and valueFrom are exclusive")
        if "value" in e and not isinstance(e["value"], str):
            c.err(ew, "value must be a string (quote %r)" % (e["value"],))
        if "valueFrom" in e and c.fields(ew + ".valueFrom", e["valueFrom"], F_VALUEFROM):
            vf = e["valueFrom"]
            if len(vf) != 1:
                c.err(ew, "valueFrom needs exactly one source")
            for src in ("secretKeyRef", "configMapKeyRef"):
                if src in vf and c.fields(ew + ".valueFrom." + src, vf[src], F_KEYREF):
                    c.need(ew + ".valueFrom." + src, vf[src], "name", "key")
                    c.refs.append((src, vf[src].get("name"), vf[src].get("key"), ew))
    mounts = set()
    for i, m in enumerate(ct.get("volumeMounts") or []):
        mw = "%s.volumeMounts[%d]" % (where, i)
        if not c.fields(mw, m, F_MOUNT):
            continue
        c.need(mw, m, "name", "mountPath")
        if m.get("name") not in volumes:
            c.err(mw, "volume %r is not in the pod's volumes" % (m.get("name"),))
        if m.get("mountPath") in mounts:
            c.err(mw, "duplicate mountPath %s" % m.get("mountPath"))
        mounts.add(m.get("mountPath"))
    sc = ct.get("securityContext")
    if sc is not None and c.fields(where + ".securityContext", sc, F_SECCTX):
        if sc.get("runAsNonRoot") and not isinstance(sc.get("runAsUser"), int):
            c.notes.append("%s: runAsNonRoot without a numeric runAsUser: the kubelet refuses "
                           "an image whose USER is a name (the idemgate image: nobody)" % where)
        if sc.get("runAsUser") == 0 and sc.get("runAsNonRoot"):
            c.err(where, "runAsNonRoot with runAsUser 0")
    return named


def check_pod_spec(c, where, spec):
    if not c.fields(where, spec, F_POD_SPEC):
        return
    volumes = {}
    for i, v in enumerate(spec.get("volumes") or []):
        vw = "%s.volumes[%d]" % (where, i)
        if not c.fields(vw, v, F_VOLUME):
            continue
        c.need(vw, v, "name")
        if len([k for k in v if k != "name"]) != 1:
            c.err(vw, "a volume needs exactly one source")
        if v.get("name") in volumes:
            c.err(vw, "duplicate volume %r" % v.get("name"))
        volumes[v.get("name")] = v
        if "configMap" in v:
            c.need(vw + ".configMap", v["configMap"], "name")
            c.refs.append(("configMap", v["configMap"].get("name"), None, vw))
        if "emptyDir" in v and c.fields(vw + ".emptyDir", v["emptyDir"] or {}, F_EMPTYDIR):
            ed = v["emptyDir"] or {}
            if ed.get("medium") not in (None, "", "Memory"):
                c.err(vw, "emptyDir.medium must be \"\" or Memory")
            if "sizeLimit" in ed:
                q = ed["sizeLimit"]
                if quantity(q) is None or isinstance(q, bool):
                    c.err(vw + ".emptyDir.sizeLimit", "%r is not a resource quantity" % (q,))
        if "persistentVolumeClaim" in v and c.fields(vw + ".persistentVolumeClaim",
                                                     v["persistentVolumeClaim"], F_PVC_SOURCE):
            c.need(vw + ".persistentVolumeClaim", v["persistentVolumeClaim"], "claimName")
        if "hostPath" in v and c.fields(vw + ".hostPath", v["hostPath"], F_HOSTPATH):
            c.need(vw + ".hostPath", v["hostPath"], "path")
    cts = spec.get("containers")
    if not isinstance(cts, list) or not cts:
        c.err(where, "containers must be a non-empty list")
        return
    names = set()
    for i, ct in enumerate(cts + (spec.get("initContainers") or [])):
        cw = "%s.containers[%d]" % (where, i)
        check_container(c, cw, ct, volumes)
        if isinstance(ct, dict):
            if ct.get("name") in names:
                c.err(cw, "duplicate container name %r" % ct.get("name"))
            names.add(ct.get("name"))
    g = spec.get("terminationGracePeriodSeconds", 30)
    if not isinstance(g, int) or g < 0:
        c.err(where, "terminationGracePeriodSeconds must be a non-negative integer")
    else:
        for ct in cts:
            s = prestop_seconds(ct) if isinstance(ct, dict) else 0
            if s is not None and s >= g:
                c.err(where, "container %s: preStop sleep %d s leaves nothing of "
                      "terminationGracePeriodSeconds %d" % (ct.get("name"), s, g))
    c.pods.append((where, spec, volumes))


def check_doc(c, where, d):
    if not isinstance(d, dict):
        c.err(where, "a document must be a mapping")
        return
    av, kind = d.get("apiVersion"), d.get("kind")
    if (av, kind) not in KINDS:
        c.err(where, "unknown apiVersion/kind %s/%s" % (av, kind))
        return
    c.fields(where, d, F_TOP)
    c.need(where, d, "metadata")
    c.metadata(where, d.get("metadata") or {})
    name = (d.get("metadata") or {}).get("name")
    where = "%s (%s %s)" % (where, kind, name)
    key = (kind, name)
    if key in c.objects:
        c.err(where, "duplicate %s %s" % key)
    c.objects[key] = d
    if kind in ("ConfigMap", "Secret"):
        for part in ("data", "stringData"):
            for k, v in (d.get(part) or {}).items():
                if not re.match(r"^[-._a-zA-Z0-9]+$", str(k)):
                    c.err(where, "%s key %r is invalid" % (part, k))
                if not isinstance(v, str):
                    c.err(where, "%s.%s must be a string" % (part, k))
        return
    spec = d.get("spec")
    if kind == "Deployment":
        if not c.fields(where + ".spec", spec, F_DEPLOY_SPEC):
            return
        c.need(where + ".spec", spec, "selector", "template")
        ml = c.selector(where + ".spec.selector", spec.get("selector") or {})
        st = spec.get("strategy")
        if st is not None and c.fields(where + ".spec.strategy", st, F_STRATEGY):
            if st.get("type", "RollingUpdate") not in ("RollingUpdate", "Recreate"):
                c.err(where, "strategy.type must be RollingUpdate or Recreate")
            ru = st.get("rollingUpdate")
            if ru is not None and c.fields(where + ".spec.strategy.rollingUpdate", ru, F_ROLLING):
                if ru.get("maxUnavailable") in (0, "0%") and ru.get("maxSurge") in (0, "0%"):
                    c.err(where, "maxUnavailable and maxSurge cannot both be 0")
        tpl = spec.get("template") or {}
        if c.fields(where + ".spec.template", tpl, F_TEMPLATE):
            tmeta = tpl.get("metadata") or {}
            c.fields(where + ".spec.template.metadata", tmeta, F_META)
            tl = tmeta.get("labels") or {}
            c.labels(where + ".spec.template.metadata.labels", tl)
            for k, v in ml.items():
                if tl.get(k) != v:
                    c.err(where, "selector %s=%s does not match the template's labels" % (k, v))
            c.templates.append((where, tl))
            check_pod_spec(c, where + ".spec.template.spec", tpl.get("spec") or {})
        r = spec.get("replicas", 1)
        if not isinstance(r, int) or r < 0:
            c.err(where, "replicas must be a non-negative integer")
    elif kind == "Service":
        if not c.fields(where + ".spec", spec, F_SERVICE_SPEC):
            return
        if spec.get("type", "ClusterIP") not in ("ClusterIP", "NodePort", "LoadBalancer",
                                                 "ExternalName"):
            c.err(where, "unknown Service type")
        c.labels(where + ".spec.selector", spec.get("selector"))
        c.services.append((where, spec))
        pnames = set()
        ports = spec.get("ports") or []
        if not ports:
            c.err(where, "a Service needs ports")
        for i, p in enumerate(ports):
            pw = "%s.spec.ports[%d]" % (where, i)
            if not c.fields(pw, p, F_SVC_PORT):
                continue
            c.need(pw, p, "port")
            c.port_int(pw + ".port", p.get("port"))
            if "targetPort" in p:
                c.port_ref(pw + ".targetPort", p["targetPort"], None)
            if len(ports) > 1 and not p.get("name"):
                c.err(pw, "every port of a multi-port Service needs a name")
            if p.get("name") in pnames:
                c.err(pw, "duplicate port name")
            pnames.add(p.get("name"))
    elif kind == "PodDisruptionBudget":
        if not c.fields(where + ".spec", spec, F_PDB_SPEC):
            return
        if ("minAvailable" in spec) == ("maxUnavailable" in spec):
            c.err(where, "exactly one of minAvailable and maxUnavailable")
        for k in ("minAvailable", "maxUnavailable"):
            v = spec.get(k)
            if v is not None and not (isinstance(v, int) and v >= 0 or
                                      isinstance(v, str) and re.match(r"^\d+%$", v)):
                c.err(where, "%s must be an integer or a percentage" % k)
        ml = c.selector(where + ".spec.selector", spec.get("selector") or {})
        c.pdbs.append((where, ml))
    elif kind in ("Pod",):
        check_pod_spec(c, where + ".spec", spec or {})


def selects(sel, labels):
    return bool(sel) and all(labels.get(k) == v for k, v in sel.items())


def cross_checks(c):
    for where, spec in c.services:
        sel = spec.get("selector") or {}
        matched = [t for t in c.templates if selects(sel, t[1])]
        if not matched:
            c.err(where, "selector %s selects no pod template in these files" % sel)
        for p in spec.get("ports") or []:
            tp = p.get("targetPort", p.get("port"))
            if isinstance(tp, str):
                for tw, _ in matched:
                    pod = next(s for w, s, _ in c.pods if w.startswith(tw))
                    if not any(tp == cp.get("name") for ct in pod.get("containers", [])
                               for cp in ct.get("ports") or []):
                        c.err(where, "targetPort %r names no container port of %s" % (tp, tw))
    for where, sel in c.pdbs:
        if not any(selects(sel, t[1]) for t in c.templates):
            c.err(where, "selector %s selects no pod template in these files" % sel)
    for kind, name, key, where in c.refs:
        if kind == "configMap" or kind == "configMapKeyRef":
            cm = c.objects.get(("ConfigMap", name))
            if cm is None:
                c.err(where, "ConfigMap %r is not in these files" % name)
            elif key is not None and key not in (cm.get("data") or {}):
                c.err(where, "ConfigMap %s has no key %r" % (name, key))
        elif kind == "secretKeyRef":
            s = c.objects.get(("Secret", name))
            if s is None:
                c.notes.append("%s: Secret %s (key %s) is created outside these files"
                               % (where, name, key))
            elif key not in (s.get("data") or {}) and key not in (s.get("stringData") or {}):
                c.err(where, "Secret %s has no key %r" % (name, key))


def lmdb_on_volume(c, where, text, env, ct, volumes, scratch):
    """With the LMDB store (the config's, or IDEMGATE_STORE's), lmdb.path
    (or IDEMGATE_LMDB_PATH) must be on a writable volume mounted in the
    container (emptyDir, persistentVolumeClaim, hostPath; not readOnly): a
    read-only root filesystem refuses it, and the container's own layer
    would lose the records at every container restart. `-t` creates and
    writes the directory, so it runs on a copy under scratch, not on this
    machine's path. Returns (config text, env) as `-t` gets them."""
    try:
        cfg = json.loads(text)
    except ValueError:
        return text, env  # -t says what is wrong with it
    if not isinstance(cfg, dict) or env.get("IDEMGATE_STORE", cfg.get("store")) != "lmdb":
        return text, env
    lm = cfg.get("lmdb") if isinstance(cfg.get("lmdb"), dict) else {}
    path = env.get("IDEMGATE_LMDB_PATH", lm.get("path", "/var/lib/idemgate"))
    if not isinstance(path, str) or not path.startswith("/"):
        return text, env
    on = None
    for m in ct.get("volumeMounts") or []:
        mp = str(m.get("mountPath", "")).rstrip("/")
        if mp and (path == mp or path.startswith(mp + "/")):
            on = m
    vol = volumes.get(on.get("name")) or {} if on else {}
    if on is None:
        c.err(where, "lmdb.path %s is on no volume of the container (readOnlyRootFilesystem "
              "refuses it; a container restart would lose its records)" % path)
    elif on.get("readOnly") or not any(k in vol for k in WRITABLE_VOLUMES) \
            or (vol.get("persistentVolumeClaim") or {}).get("readOnly"):
        c.err(where, "lmdb.path %s is on volume %r, which is not writable (mount it from "
              "an emptyDir, a persistentVolumeClaim or a hostPath, not readOnly)"
              % (path, on.get("name")))
    local = os.path.join(scratch, "lmdb" + path)
    if "IDEMGATE_LMDB_PATH" in env:
        env = dict(env, IDEMGATE_LMDB_PATH=local)
    else:
        cfg["lmdb"] = dict(lm, path=local)
        text = json.dumps(cfg)
    return text, env


def idemgate_configs(c, binary):
    """`BIN -t -c` on the config each idemgate container reads; the pod's
    timing and ports against that config."""
    n = 0
    for where, spec, volumes in c.pods:
        for ct in spec.get("containers") or []:
            args = (ct.get("command") or []) + (ct.get("args") or [])
            if "idemgate" not in ct.get("image", "") or "-c" not in args:
                continue
            cw = "%s container %s" % (where, ct.get("name"))
            path = args[args.index("-c") + 1]
            text = None
            for m in ct.get("volumeMounts") or []:
                mp = m["mountPath"].rstrip("/") + "/"
                if path.startswith(mp):
                    vol = volumes.get(m["name"]) or {}
                    cm = c.objects.get(("ConfigMap", (vol.get("configMap") or {}).get("name")))
                    if cm is not None:
                        text = (cm.get("data") or {}).get(path[len(mp):])
            if text is None:
                c.err(cw, "-c %s is not a key of a ConfigMap mounted in the container" % path)
                continue
            # The environment the container sets (literal values only)
            # takes part, as it does in the pod.
            env = {k: v for k, v in os.environ.items() if not k.startswith("IDEM")}
            for e in ct.get("env") or []:
                if isinstance(e, dict) and isinstance(e.get("name"), str) \
                        and isinstance(e.get("value"), str):
                    env[e["name"]] = e["value"]
            scratch = tempfile.mkdtemp(prefix="check-k8s-")
            try:
                text, env = lmdb_on_volume(c, cw, text, env, ct, volumes, scratch)
                with open(os.path.join(scratch, "idemgate.json"), "w") as f:
                    f.write(text)
                r = subprocess.run([binary, "-t", "-c", f.name], capture_output=True, text=True,
                                   env=env, timeout=30)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            out = (r.stdout + r.stderr).strip()
            if r.returncode != 0:
                c.err(cw, "idemgate -t: %s (exit %d)" % (out, r.returncode))
                continue
            print("  %s: idemgate -t -c %s: %s" % (cw, path, out))
            n += 1
            cfg = json.loads(text)
            grace_ms = (cfg.get("limits") or {}).get("shutdown_grace_ms", 10000)
            pre = prestop_seconds(ct) or 0
            tg = spec.get("terminationGracePeriodSeconds", 30)
            need = pre + math.ceil(grace_ms / 1000)
            if tg < need:
                c.err(cw, "terminationGracePeriodSeconds %d < preStop %d s + shutdown_grace_ms "
                      "%d ms" % (tg, pre, grace_ms))
            if not ((ct.get("lifecycle") or {}).get("preStop")):
                c.err(cw, "no preStop hook: SIGTERM may come before the endpoints update")
            admin = (cfg.get("admin") or {}).get("listen", "127.0.0.1:9091")
            host, _, aport = admin.rpartition(":")
            if host in ("127.0.0.1", "localhost", "[::1]"):
                c.err(cw, "admin.listen %s is loopback: the kubelet's probes cannot reach it"
                      % admin)
            named = {p.get("name"): p.get("containerPort") for p in ct.get("ports") or []}
            lport = int(cfg.get("listen", "0.0.0.0:8080").rpartition(":")[2])
            if lport not in named.values():
                c.err(cw, "listen port %d is not a containerPort" % lport)
            for probe, path_ in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
                hg = (ct.get(probe) or {}).get("httpGet")
                if not hg:
                    c.err(cw, "%s must be an httpGet of %s on the admin port" % (probe, path_))
                    continue
                port = named.get(hg.get("port"), hg.get("port"))
                if port != int(aport):
                    c.err(cw, "%s port %r is not admin.listen's %s" % (probe, hg.get("port"), aport))
                if hg.get("path") != path_:
                    c.err(cw, "%s path %r, expected %s" % (probe, hg.get("path"), path_))
            if not (ct.get("resources") or {}).get("requests"):
                c.err(cw, "no resource requests")
    return n


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--idemgate", help="binary for `-t` on the embedded configs")
    ap.add_argument("files", nargs="+")
    a = ap.parse_args()
    total_errors = 0
    for path in a.files:
        c = Checker()
        c.objects, c.templates, c.services, c.pdbs, c.pods, c.refs = {}, [], [], [], [], []
        try:
            with open(path) as f:
                docs = [d for d in yaml.safe_load_all(f) if d is not None]
        except yaml.YAMLError as e:
            print("%s: YAML: %s" % (path, e))
            total_errors += 1
            continue
        for i, d in enumerate(docs):
            check_doc(c, "%s[%d]" % (path, i), d)
        cross_checks(c)
        kinds = ", ".join("%s/%s" % k for k in c.objects)
        print("%s: %d documents (%s)" % (path, len(docs), kinds))
        if a.idemgate:
            if idemgate_configs(c, a.idemgate) == 0 and not c.errors:
                c.err(path, "no idemgate container with a -c config found")
        for n in c.notes:
            print("  note: " + n)
        for e in c.errors:
            print("  ERROR: " + e)
        total_errors += len(c.errors)
    if total_errors:
        print("check-k8s: %d error(s)" % total_errors)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
