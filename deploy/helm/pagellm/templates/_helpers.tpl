{{/* The chart's name and the release's full name (at most 63 characters, as Kubernetes names must be). */}}
{{- define "pagellm.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "pagellm.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* Labels of every object, and the subset that selects the pods. */}}
{{- define "pagellm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pagellm.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "pagellm.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "pagellm.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "pagellm.cacheClaim" -}}
{{- default (printf "%s-model-cache" (include "pagellm.fullname" .)) .Values.modelCache.existingClaim }}
{{- end }}
