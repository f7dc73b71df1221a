{{/* Names and labels, as `helm create` makes them. */}}
{{- define "wattson.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "wattson.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* The hub's Deployment, Service and ConfigMap: <fullname>-hub (the fullname cut to leave room). */}}
{{- define "wattson.hubName" -}}
{{- printf "%s-hub" (include "wattson.fullname" . | trunc 59 | trimSuffix "-") }}
{{- end }}

{{- define "wattson.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "wattson.selectorLabels" -}}
app.kubernetes.io/name: {{ include "wattson.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "wattson.labels" -}}
helm.sh/chart: {{ include "wattson.chart" . }}
{{ include "wattson.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: wattson
{{- end }}

{{- define "wattson.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "wattson.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "wattson.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/*
The hub's URL as the hosts reach it: its Service, by the namespace-qualified name.
*/}}
{{- define "wattson.hubURL" -}}
{{- $scheme := ternary "https" "http" (.Values.hub.webConfig.tls | default false) }}
{{- printf "%s://%s.%s.svc:%d" $scheme (include "wattson.hubName" .) .Release.Namespace (int .Values.hub.service.port) }}
{{- end }}

{{/*
The DaemonSet's wattson.yml. A string is used verbatim. A mapping is rendered as YAML; with the hub enabled,
each signal (carbon, price) that config.grid does not set gets a chain reading the hub first, then
hub.hostFallback, in the hub's zone for that signal. A signal the hub does not serve is left to wattson's
default.
*/}}
{{- define "wattson.config" -}}
{{- if kindIs "string" .Values.config }}
{{- .Values.config }}
{{- else }}
{{- $cfg := deepCopy (.Values.config | default dict) }}
{{- if .Values.hub.enabled }}
{{- $grid := deepCopy (get $cfg "grid" | default dict) }}
{{- $hubConfig := .Values.hub.config | default dict }}
{{- $hubGrid := dict }}
{{- if kindIs "map" $hubConfig }}
{{- $hubGrid = get $hubConfig "grid" | default dict }}
{{- end }}
{{- range $signal := list "carbon" "price" }}
{{- $hubSignal := get $hubGrid $signal }}
{{- if and (not (hasKey $grid $signal)) (kindIs "map" $hubSignal) }}
{{- $source := dict "type" "wattson" "base_url" (include "wattson.hubURL" $) }}
{{- $sources := concat (list $source) (get $.Values.hub.hostFallback $signal | default list) }}
{{- $_ := set $grid $signal (dict "zone" (get $hubSignal "zone" | default "DE") "sources" $sources) }}
{{- end }}
{{- end }}
{{- $_ := set $cfg "grid" $grid }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}
{{- end }}

{{/*
The hub's wattson.yml: hub.config with gpu.backend none. The defaults set both signals, so a signal missing
here was set to null by the user (Helm drops null values): it is written as null, which disables it.
*/}}
{{- define "wattson.hubConfig" -}}
{{- if kindIs "string" .Values.hub.config }}
{{- .Values.hub.config }}
{{- else }}
{{- $cfg := deepCopy (.Values.hub.config | default dict) }}
{{- $gpu := deepCopy (get $cfg "gpu" | default dict) }}
{{- $_ := set $gpu "backend" "none" }}
{{- $_ := set $cfg "gpu" $gpu }}
{{- $grid := deepCopy (get $cfg "grid" | default dict) }}
{{- range $signal := list "carbon" "price" }}
{{- if not (hasKey $grid $signal) }}
{{- $_ := set $grid $signal nil }}
{{- end }}
{{- end }}
{{- $_ := set $cfg "grid" $grid }}
{{- toYaml $cfg }}
{{- end }}
{{- end }}

{{/*
The uid and gid wattson runs as: podSecurityContext's, else the image's (10001). Called with a key.
*/}}
{{- define "wattson.runAs" -}}
{{- $ctx := .ctx | default dict }}
{{- if hasKey $ctx .key }}{{ get $ctx .key | int64 }}{{ else }}10001{{ end }}
{{- end }}

{{/*
A probe from values; an httpGet probe without a scheme gets HTTPS when the web config enables TLS.
Called with (dict "probe" PROBE "tls" BOOL).
*/}}
{{- define "wattson.probe" -}}
{{- $probe := deepCopy .probe }}
{{- if and .tls (hasKey $probe "httpGet") }}
{{- $get := get $probe "httpGet" }}
{{- if not (hasKey $get "scheme") }}
{{- $_ := set $get "scheme" "HTTPS" }}
{{- end }}
{{- end }}
{{- toYaml $probe }}
{{- end }}

{{/*
Scrape relabelings shared by the ServiceMonitor and the PodMonitor. Called with the monitor's values.
*/}}
{{- define "wattson.relabelings" -}}
{{- if .instanceFromNodeName }}
- sourceLabels: [__meta_kubernetes_pod_node_name]
  targetLabel: instance
  action: replace
{{- end }}
{{- with .relabelings }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "wattson.metricRelabelings" -}}
{{- if and .workloadLabels (not .honorLabels) }}
{{- range $label := list "namespace" "pod" }}
# wattson_workload_info always carries the workload's {{ $label }} (empty for workloads without one).
- sourceLabels: [__name__, exported_{{ $label }}]
  regex: "wattson_workload_info;(.*)"
  targetLabel: {{ $label }}
  replacement: "$1"
  action: replace
- sourceLabels: [__name__, exported_{{ $label }}]
  regex: "wattson_workload_.+;(.+)"
  targetLabel: {{ $label }}
  replacement: "$1"
  action: replace
{{- end }}
- regex: exported_(namespace|pod)
  action: labeldrop
{{- end }}
{{- with .metricRelabelings }}
{{ toYaml . }}
{{- end }}
{{- end }}
