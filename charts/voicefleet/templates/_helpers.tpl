{{/* Name of the chart's objects: the release name, plus "-voicefleet" unless it says so. */}}
{{- define "voicefleet.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "voicefleet.selectorLabels" -}}
app.kubernetes.io/name: voicefleet-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "voicefleet.labels" -}}
{{ include "voicefleet.selectorLabels" . }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: voicefleet
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "voicefleet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "voicefleet.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The platform Secret with LIVEKIT_API_KEY and LIVEKIT_API_SECRET. */}}
{{- define "voicefleet.livekitSecretName" -}}
{{- default (printf "%s-livekit" (include "voicefleet.fullname" .)) .Values.livekit.existingSecret -}}
{{- end -}}

{{- define "voicefleet.deskSelectorLabels" -}}
app.kubernetes.io/name: voicefleet-desk
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "voicefleet.deskLabels" -}}
{{ include "voicefleet.deskSelectorLabels" . }}
app.kubernetes.io/component: desk
app.kubernetes.io/part-of: voicefleet
{{- end -}}

{{/* The desk's Secret with its TTS provider's key (OPENAI_API_KEY or ELEVEN_API_KEY). */}}
{{- define "voicefleet.deskSecretName" -}}
{{- if .Values.desk.existingSecret -}}
{{- .Values.desk.existingSecret -}}
{{- else if .Values.desk.apiKey -}}
{{- printf "%s-desk-tts" (include "voicefleet.fullname" .) -}}
{{- else -}}
{{- required "desk.existingSecret is required with desk.enabled: a Secret in the release namespace with the desk's TTS key (OPENAI_API_KEY or ELEVEN_API_KEY); or desk.apiKey, or desk.enabled false" "" -}}
{{- end -}}
{{- end -}}

{{/* The prefix of the desk Service's environment variables in pods (<NAME>_SERVICE_HOST). */}}
{{- define "voicefleet.deskServiceEnv" -}}
{{- printf "%s-desk" (include "voicefleet.fullname" .) | upper | replace "-" "_" | replace "." "_" -}}
{{- end -}}

{{- define "voicefleet.operatorImage" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "voicefleet.runtimeImage" -}}
{{- printf "%s:%s" .Values.runtime.image.repository (default .Chart.AppVersion .Values.runtime.image.tag) -}}
{{- end -}}

{{- /* tenantLimits as the operator reads them: "ns=calls,..." and the default (empty: none). */}}
{{- define "voicefleet.namespaceCallLimits" -}}
{{- $parts := list -}}
{{- range $namespace, $calls := .Values.tenantLimits.namespaces -}}
{{- $parts = append $parts (printf "%s=%d" $namespace (int $calls)) -}}
{{- end -}}
{{- join "," $parts -}}
{{- end -}}

{{- define "voicefleet.defaultNamespaceCallLimit" -}}
{{- $calls := .Values.tenantLimits.defaultMaxConcurrentCalls -}}
{{- if not (kindIs "invalid" $calls) -}}{{ printf "%d" (int $calls) }}{{- end -}}
{{- end -}}

{{- /* A label map as the operator reads it: "key=value,key=value" (empty for none). */}}
{{- define "voicefleet.labelList" -}}
{{- $pairs := list -}}
{{- range $key, $value := . -}}
{{- $pairs = append $pairs (printf "%s=%s" $key $value) -}}
{{- end -}}
{{- join "," $pairs -}}
{{- end -}}
