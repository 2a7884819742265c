{{/* Names and labels, in the conventions of Helm's own chart scaffold. */}}
{{- define "aura.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "aura.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "aura.eppName" -}}
{{- printf "%s-epp" (include "aura.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "aura.selectorLabels" -}}
app.kubernetes.io/name: {{ include "aura.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: model-server
{{- end -}}

{{- define "aura.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{ include "aura.selectorLabels" . }}
{{- end -}}

{{- define "aura.eppSelectorLabels" -}}
app.kubernetes.io/name: {{ include "aura.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: endpoint-picker
{{- end -}}

{{/* SIGTERM arrives after preStop; the drain then needs drainTimeoutSeconds; 10 s of margin. */}}
{{- define "aura.terminationGrace" -}}
{{- add .Values.server.preStopSleepSeconds .Values.server.drainTimeoutSeconds 10 -}}
{{- end -}}
