{{/* Names and labels shared by every template. */}}

{{- define "rlhf-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "rlhf-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "rlhf-operator.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "rlhf-operator.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "rlhf-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rlhf-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "rlhf-operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "rlhf-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: rlhf-operator
{{- end }}

{{/* The operator's ServiceAccount. */}}
{{- define "rlhf-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "rlhf-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The namespace the operator serves ("" = every namespace). */}}
{{- define "rlhf-operator.watchNamespace" -}}
{{- .Values.watchNamespace | default "" }}
{{- end }}

{{/* The Ray pods' ServiceAccount: fixed, because the operator names it (builders.TRAINER_SERVICE_ACCOUNT,
checked by tests/chart). A job can name another one in spec.cluster.serviceAccountName. */}}
{{- define "rlhf-operator.trainerServiceAccountName" -}}
rlhf-trainer
{{- end }}

{{/* Namespaces that get the trainer ServiceAccount and its Role, as a JSON list. */}}
{{- define "rlhf-operator.trainerNamespaces" -}}
{{- if .Values.trainer.namespaces }}
{{- .Values.trainer.namespaces | uniq | toJson }}
{{- else }}
{{- list (.Values.watchNamespace | default .Release.Namespace) | toJson }}
{{- end }}
{{- end }}

{{- define "rlhf-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
