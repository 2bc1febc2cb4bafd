{{/* Chart name, truncated to the 63 characters a DNS label allows. */}}
{{- define "tunefleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full release name; object names append -server / -worker, so keep room for them. */}}
{{- define "tunefleet.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 56 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 56 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 56 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "tunefleet.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "tunefleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tunefleet
{{- end }}

{{/* Selector labels; $component is "server" or "worker". */}}
{{- define "tunefleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tunefleet.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "tunefleet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tunefleet.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "tunefleet.image" -}}
{{- $img := index .root.Values.image .component -}}
{{- printf "%s:%s" $img.repository (default .root.Chart.AppVersion $img.tag) }}
{{- end }}

{{- define "tunefleet.serverAddress" -}}
{{- default (printf "%s-server:%d" (include "tunefleet.fullname" .) (int .Values.server.port)) .Values.worker.serverAddress }}
{{- end }}

{{/* Name of the Secret holding the join token, empty when none is configured. */}}
{{- define "tunefleet.joinTokenSecret" -}}
{{- if .Values.joinToken.existingSecret }}
{{- .Values.joinToken.existingSecret }}
{{- else if .Values.joinToken.value }}
{{- printf "%s-join-token" (include "tunefleet.fullname" .) }}
{{- end }}
{{- end }}

{{- define "tunefleet.joinTokenEnv" -}}
{{- $secret := include "tunefleet.joinTokenSecret" . }}
{{- if $secret }}
- name: TUNE_JOIN_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ .Values.joinToken.key }}
{{- end }}
{{- end }}

{{/* True when the Prometheus Operator CRDs are served by the cluster (or --api-versions). */}}
{{- define "tunefleet.hasMonitoringApi" -}}
{{- if .Capabilities.APIVersions.Has "monitoring.coreos.com/v1" }}true{{- end }}
{{- end }}
