{{/*
Names, labels and the checks every template shares.
*/}}

{{/* The chart name, overridable with nameOverride. */}}
{{- define "analysisq.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The base name of every resource: <release>-<chart>, or the release name alone when it
already contains the chart name. Truncated so that suffixes ("-operator") stay within 63.
*/}}
{{- define "analysisq.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "analysisq.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every resource. */}}
{{- define "analysisq.labels" -}}
helm.sh/chart: {{ include "analysisq.chart" . }}
{{ include "analysisq.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: analysisq
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels that select; add app.kubernetes.io/component per workload. */}}
{{- define "analysisq.selectorLabels" -}}
app.kubernetes.io/name: {{ include "analysisq.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The image of every role: repository[:tag][@digest]; the tag defaults to appVersion. */}}
{{- define "analysisq.image" -}}
{{- $ref := printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- if .Values.image.digest }}
{{- $ref = printf "%s@%s" $ref .Values.image.digest }}
{{- end }}
{{- $ref }}
{{- end }}

{{/* ServiceAccount names of the three roles. */}}
{{- define "analysisq.operatorServiceAccount" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (printf "%s-operator" (include "analysisq.fullname" .)) .Values.operator.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "analysisq.triggerServiceAccount" -}}
{{- if .Values.trigger.serviceAccount.create }}
{{- default (printf "%s-trigger" (include "analysisq.fullname" .)) .Values.trigger.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.trigger.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The workers' ServiceAccount, created in every watched namespace; empty in cluster-wide mode,
where the operator cannot know the namespaces in advance and workers run as `default`
(without a token: the operator sets automountServiceAccountToken false on worker pods).
*/}}
{{- define "analysisq.workerServiceAccount" -}}
{{- if and .Values.worker.serviceAccount.create (not .Values.operator.clusterWide) }}
{{- default (printf "%s-worker" (include "analysisq.fullname" .)) .Values.worker.serviceAccount.name }}
{{- else }}
{{- .Values.worker.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The namespaces the operator manages: watchNamespaces, else the release namespace. */}}
{{- define "analysisq.watchNamespaces" -}}
{{- if .Values.operator.watchNamespaces }}
{{- join "," (uniq .Values.operator.watchNamespaces) }}
{{- else }}
{{- .Release.Namespace }}
{{- end }}
{{- end }}

{{/* The run template ConfigMap of the trigger. */}}
{{- define "analysisq.triggerTemplateName" -}}
{{- printf "%s-run-template" (include "analysisq.fullname" .) }}
{{- end }}

{{/* The pod securityContext every role shares (restricted Pod Security profile). */}}
{{- define "analysisq.podSecurityContext" -}}
{{- toYaml .Values.podSecurityContext }}
{{- end }}

{{- define "analysisq.containerSecurityContext" -}}
{{- toYaml .Values.securityContext }}
{{- end }}

{{/* DATABASE_URL from the existing Secret: the URL never appears in a manifest. */}}
{{- define "analysisq.databaseEnv" -}}
- name: DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.database.existingSecret | quote }}
      key: {{ .Values.database.key | quote }}
- name: ANALYSISQ_DATABASE_POOLER
  value: {{ .Values.database.pooler | quote }}
{{- end }}

{{/*
Contradictory or missing values stop the render with a message saying what to change.
Included by the operator Deployment, which every install renders.
*/}}
{{- define "analysisq.validate" -}}
{{- if not .Values.database.existingSecret }}
{{- fail "database.existingSecret is required: create a Secret holding the PostgreSQL URL (kubectl create secret generic analysisq-database --from-literal=url=postgresql://...) and name it here" }}
{{- end }}
{{- if and .Values.operator.clusterWide .Values.operator.watchNamespaces }}
{{- fail "operator.clusterWide and operator.watchNamespaces contradict each other: set one or the other" }}
{{- end }}
{{- if gt (int .Values.operator.replicas) 1 }}
{{- fail "operator.replicas must be 0 or 1: the operator runs in kopf standalone mode (one active replica, Recreate); a second replica would reconcile every run twice" }}
{{- end }}
{{- if and .Values.serviceMonitor.enabled (not .Values.metrics.enabled) }}
{{- fail "serviceMonitor.enabled needs metrics.enabled: there is no metrics endpoint to scrape" }}
{{- end }}
{{- if and .Values.prometheusRule.enabled (not .Values.metrics.enabled) }}
{{- fail "prometheusRule.enabled needs metrics.enabled: the alerts are written against the operator's metrics" }}
{{- end }}
{{- if and .Values.metrics.enabled (eq (int .Values.metrics.port) (int .Values.operator.healthPort)) }}
{{- fail "metrics.port and operator.healthPort must differ" }}
{{- end }}
{{- if and .Values.dashboard.enabled (or (eq (int .Values.dashboard.port) (int .Values.operator.healthPort)) (and .Values.metrics.enabled (eq (int .Values.dashboard.port) (int .Values.metrics.port)))) }}
{{- fail "dashboard.port must differ from operator.healthPort and metrics.port" }}
{{- end }}
{{- if and .Values.dashboard.actionTokenSecret (not .Values.dashboard.enabled) }}
{{- fail "dashboard.actionTokenSecret needs dashboard.enabled: there is no dashboard to act from" }}
{{- end }}
{{- if and (not .Values.operator.serviceAccount.create) (not .Values.operator.serviceAccount.name) }}
{{- fail "operator.serviceAccount.name is required when operator.serviceAccount.create is false: the chart would grant the operator's rights to the namespace's default account" }}
{{- end }}
{{- if and .Values.trigger.enabled (not .Values.trigger.serviceAccount.create) (not .Values.trigger.serviceAccount.name) }}
{{- fail "trigger.serviceAccount.name is required when trigger.serviceAccount.create is false: the chart would grant the trigger's rights to the namespace's default account" }}
{{- end }}
{{- if .Values.trigger.enabled }}
{{- if not .Values.trigger.template.targets }}
{{- fail "trigger.template needs at least one target: it is the spec of the daily AnalysisRun" }}
{{- end }}
{{- if gt (len .Values.trigger.prefix) 54 }}
{{- fail "trigger.prefix is too long: <prefix>-YYYYMMDD must fit in 63 characters" }}
{{- end }}
{{- end }}
{{- end }}
