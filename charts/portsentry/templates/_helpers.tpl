{{/* Chart name, bounded to 63 characters. */}}
{{- define "portsentry.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name of the release's objects. */}}
{{- define "portsentry.fullname" -}}
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

{{/* Name of the operator's objects (Deployment, Service, webhook configuration). */}}
{{- define "portsentry.operator" -}}
{{- printf "%s-operator" (include "portsentry.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "portsentry.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "portsentry.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: portsentry
{{- end -}}

{{- define "portsentry.selectorLabels" -}}
app.kubernetes.io/name: {{ include "portsentry.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "portsentry.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "portsentry.operator" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "portsentry.operatorImage" -}}
{{- printf "%s:%s" .Values.operator.image.repository (default .Chart.AppVersion .Values.operator.image.tag) -}}
{{- end -}}

{{- define "portsentry.sensorImage" -}}
{{- printf "%s:%s" .Values.sensor.image.repository (default .Chart.AppVersion .Values.sensor.image.tag) -}}
{{- end -}}

{{/* The Service's DNS name: the webhook serving certificate's subject. */}}
{{- define "portsentry.serviceHost" -}}
{{- printf "%s.%s.svc" (include "portsentry.operator" .) .Release.Namespace -}}
{{- end -}}

{{/* Secret holding the webhook serving certificate when cert-manager issues it. */}}
{{- define "portsentry.webhookSecret" -}}
{{- printf "%s-webhook-tls" (include "portsentry.operator" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* ServiceAccount of the node sensors (the operator names it in their DaemonSets). */}}
{{- define "portsentry.nodeSensorServiceAccount" -}}
{{- default (printf "%s-node-sensor" (include "portsentry.fullname" .) | trunc 63 | trimSuffix "-") .Values.nodeSensors.serviceAccount.name -}}
{{- end -}}

{{/* Image of the node sensors: their own when set, else the sidecar's. */}}
{{- define "portsentry.nodeSensorImage" -}}
{{- if .Values.nodeSensors.image.repository -}}
{{- printf "%s:%s" .Values.nodeSensors.image.repository (default .Chart.AppVersion .Values.nodeSensors.image.tag) -}}
{{- else -}}
{{- include "portsentry.sensorImage" . -}}
{{- end -}}
{{- end -}}

{{/* The node sensors' settings as the operator reads them (PORTSENTRY_NODE_SENSOR_SETTINGS). */}}
{{- define "portsentry.nodeSensorSettings" -}}
{{- $settings := dict "image" (include "portsentry.nodeSensorImage" .) "imagePullPolicy" (default .Values.sensor.image.pullPolicy .Values.nodeSensors.image.pullPolicy) "serviceAccountName" (include "portsentry.nodeSensorServiceAccount" .) "tolerations" .Values.nodeSensors.tolerations "priorityClassName" .Values.nodeSensors.priorityClassName "resources" .Values.nodeSensors.resources -}}
{{- toJson $settings -}}
{{- end -}}
