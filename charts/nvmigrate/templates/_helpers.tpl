{{/*
Names, labels and the pieces both processes share (etcd flags, TLS mounts, tracing env).
*/}}

{{- define "nvmigrate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* <release>-<chart>, or the release alone when it already holds the chart's name. Truncated so
that the longest suffix used ("-etcd-headless", 14) still fits a 63-character DNS label. */}}
{{- define "nvmigrate.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 49 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 49 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 49 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "nvmigrate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels of one component: include "nvmigrate.selectorLabels" (list $ "agent") */}}
{{- define "nvmigrate.selectorLabels" -}}
{{- $ctx := index . 0 -}}
app.kubernetes.io/name: {{ include "nvmigrate.name" $ctx }}
app.kubernetes.io/instance: {{ $ctx.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{/* Every object's labels: include "nvmigrate.labels" (list $ "orchestrator") */}}
{{- define "nvmigrate.labels" -}}
{{- $ctx := index . 0 -}}
helm.sh/chart: {{ include "nvmigrate.chart" $ctx }}
{{ include "nvmigrate.selectorLabels" . }}
app.kubernetes.io/part-of: nvmigrate
app.kubernetes.io/version: {{ $ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $ctx.Release.Service }}
{{- with $ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "nvmigrate.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "nvmigrate.orchestrator.serviceAccountName" -}}
{{- if .Values.orchestrator.serviceAccount.create -}}
{{- default (printf "%s-orchestrator" (include "nvmigrate.fullname" .)) .Values.orchestrator.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.orchestrator.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "nvmigrate.agent.serviceAccountName" -}}
{{- if .Values.agent.serviceAccount.create -}}
{{- default (printf "%s-agent" (include "nvmigrate.fullname" .)) .Values.agent.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.agent.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* ---- bundled etcd ---------------------------------------------------------------------- */}}

{{- define "nvmigrate.etcd.fullname" -}}
{{- printf "%s-etcd" (include "nvmigrate.fullname" .) -}}
{{- end -}}

{{- define "nvmigrate.etcd.headless" -}}
{{- printf "%s-etcd-headless" (include "nvmigrate.fullname" .) -}}
{{- end -}}

{{- define "nvmigrate.etcd.scheme" -}}
{{- if .Values.etcd.tls.enabled }}https{{ else }}http{{ end -}}
{{- end -}}

{{/* The DNS name of bundled member N: include "nvmigrate.etcd.memberHost" (list $ N) */}}
{{- define "nvmigrate.etcd.memberHost" -}}
{{- $ctx := index . 0 -}}
{{- printf "%s-%d.%s.%s.svc.%s" (include "nvmigrate.etcd.fullname" $ctx) (index . 1) (include "nvmigrate.etcd.headless" $ctx) $ctx.Release.Namespace $ctx.Values.etcd.bundled.clusterDomain -}}
{{- end -}}

{{/* --initial-cluster: name=peer URL of every member */}}
{{- define "nvmigrate.etcd.initialCluster" -}}
{{- $members := list -}}
{{- range $i := until (int .Values.etcd.bundled.replicas) -}}
{{- $members = append $members (printf "%s-%d=%s://%s:2380" (include "nvmigrate.etcd.fullname" $) $i (include "nvmigrate.etcd.scheme" $) (include "nvmigrate.etcd.memberHost" (list $ $i))) -}}
{{- end -}}
{{- join "," $members -}}
{{- end -}}

{{/* ---- what both processes are given to reach etcd -------------------------------------- */}}

{{/* --etcd: every bundled member, or the external endpoints, comma-separated */}}
{{- define "nvmigrate.etcd.endpoints" -}}
{{- if .Values.etcd.bundled.enabled -}}
{{- $endpoints := list -}}
{{- range $i := until (int .Values.etcd.bundled.replicas) -}}
{{- $endpoints = append $endpoints (printf "%s:2379" (include "nvmigrate.etcd.memberHost" (list $ $i))) -}}
{{- end -}}
{{- join "," $endpoints -}}
{{- else -}}
{{- join "," .Values.etcd.endpoints -}}
{{- end -}}
{{- end -}}

{{- define "nvmigrate.etcd.clientSecret" -}}
{{- if .Values.certManager.enabled -}}
{{- printf "%s-etcd-client-tls" (include "nvmigrate.fullname" .) -}}
{{- else -}}
{{- .Values.etcd.tls.existingSecret -}}
{{- end -}}
{{- end -}}

{{- define "nvmigrate.etcd.serverSecret" -}}
{{- if .Values.certManager.enabled -}}
{{- printf "%s-etcd-server-tls" (include "nvmigrate.fullname" .) -}}
{{- else -}}
{{- .Values.etcd.tls.serverExistingSecret -}}
{{- end -}}
{{- end -}}

{{- define "nvmigrate.etcd.passwordSecret" -}}
{{- default (printf "%s-etcd-auth" (include "nvmigrate.fullname" .)) .Values.etcd.auth.existingSecret -}}
{{- end -}}

{{- define "nvmigrate.etcd.tlsDir" -}}/etc/nvmigrate/etcd-tls{{- end -}}

{{/* The etcd flags of both processes, as container args lines. */}}
{{- define "nvmigrate.etcd.args" -}}
- --etcd={{ include "nvmigrate.etcd.endpoints" . }}
{{- with .Values.etcd.prefix }}
- --etcd-prefix={{ . }}
{{- end }}
{{- if .Values.etcd.tls.enabled }}
- --etcd-ca={{ include "nvmigrate.etcd.tlsDir" . }}/ca.crt
{{- if .Values.etcd.tls.clientCertificate }}
- --etcd-cert={{ include "nvmigrate.etcd.tlsDir" . }}/tls.crt
- --etcd-key={{ include "nvmigrate.etcd.tlsDir" . }}/tls.key
{{- end }}
{{- end }}
{{- if .Values.etcd.auth.enabled }}
- --etcd-user={{ .Values.etcd.auth.username }}
{{- end }}
{{- end -}}

{{/* Environment both processes share: the etcd password, tracing. */}}
{{- define "nvmigrate.sharedEnv" -}}
{{- if .Values.etcd.auth.enabled }}
- name: NVMIGRATE_ETCD_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "nvmigrate.etcd.passwordSecret" . }}
      key: {{ .Values.etcd.auth.passwordKey }}
{{- end }}
{{- with .Values.tracing.otlpEndpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ . | quote }}
{{- end }}
{{- range $name, $value := .Values.tracing.extraEnv }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
{{- end -}}

{{- define "nvmigrate.etcd.tlsVolumeMount" -}}
{{- if .Values.etcd.tls.enabled }}
- name: etcd-tls
  mountPath: {{ include "nvmigrate.etcd.tlsDir" . }}
  readOnly: true
{{- end }}
{{- end -}}

{{- define "nvmigrate.etcd.tlsVolume" -}}
{{- if .Values.etcd.tls.enabled }}
- name: etcd-tls
  secret:
    secretName: {{ include "nvmigrate.etcd.clientSecret" . }}
    defaultMode: 0440
{{- end }}
{{- end -}}

{{/* ---- mutual TLS of the processes (tls.*) ------------------------------------------------ */}}

{{- define "nvmigrate.tls.dir" -}}/etc/nvmigrate/tls{{- end -}}

{{/* The --tls-* flags of a process whose ca.crt, tls.crt, tls.key are mounted at the TLS dir. */}}
{{- define "nvmigrate.tls.args" -}}
{{- if .Values.tls.enabled }}
- --tls-ca={{ include "nvmigrate.tls.dir" . }}/ca.crt
- --tls-cert={{ include "nvmigrate.tls.dir" . }}/tls.crt
- --tls-key={{ include "nvmigrate.tls.dir" . }}/tls.key
{{- end }}
{{- end -}}

{{- define "nvmigrate.tls.volumeMount" -}}
{{- if .Values.tls.enabled }}
- name: tls
  mountPath: {{ include "nvmigrate.tls.dir" . }}
  readOnly: true
{{- end }}
{{- end -}}

{{- define "nvmigrate.tls.orchestratorSecret" -}}
{{- if .Values.tls.certManager.enabled -}}
{{- printf "%s-orchestrator-tls" (include "nvmigrate.fullname" .) -}}
{{- else -}}
{{- .Values.tls.orchestrator.existingSecret -}}
{{- end -}}
{{- end -}}

{{- define "nvmigrate.tls.operatorSecret" -}}
{{- printf "%s-operator-tls" (include "nvmigrate.fullname" .) -}}
{{- end -}}

{{/* Whether the agents ask cert-manager for their certificates at pod start: "true" or "". */}}
{{- define "nvmigrate.tls.agentRequests" -}}
{{- if and .Values.tls.enabled .Values.tls.certManager.enabled -}}true{{- end -}}
{{- end -}}

{{/* The agent's node name and the IP it is reached at (the node's with hostNetwork, else the pod's). */}}
{{- define "nvmigrate.agent.addressEnv" -}}
- name: NODE_NAME
  valueFrom:
    fieldRef:
      fieldPath: spec.nodeName
- name: ADVERTISE_IP
  valueFrom:
    fieldRef:
      fieldPath: {{ if .Values.agent.hostNetwork }}status.hostIP{{ else }}status.podIP{{ end }}
{{- end -}}

{{/* Whether the agent drives real hardware (privileged, root, device mounts): "true" or "". */}}
{{- define "nvmigrate.agent.realBackend" -}}
{{- if has .Values.agent.backend (list "nvme-passthru" "vfio") -}}true{{- end -}}
{{- end -}}

{{/* The host device paths the agent mounts, each once: the device, the slots' block devices
(nvme-passthru), the listed devicePaths (vfio). */}}
{{- define "nvmigrate.agent.devicePaths" -}}
{{- $paths := list -}}
{{- if include "nvmigrate.agent.realBackend" . -}}
{{- $paths = append $paths .Values.agent.device -}}
{{- if eq .Values.agent.backend "nvme-passthru" -}}
{{- range .Values.agent.slots -}}
{{- $paths = append $paths (regexReplaceAll "^[0-9]+:[0-9]+:" . "") -}}
{{- end -}}
{{- else -}}
{{- $paths = concat $paths .Values.agent.devicePaths -}}
{{- end -}}
{{- end -}}
{{- toJson (uniq $paths) -}}
{{- end -}}

{{/* A number as a flag value: whole numbers without an exponent (values arrive as float64, and
1000000 would print as 1e+06). */}}
{{- define "nvmigrate.number" -}}
{{- if eq (float64 .) (float64 (int64 .)) -}}{{ int64 . }}{{- else -}}{{ . }}{{- end -}}
{{- end -}}
