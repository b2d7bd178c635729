{{/*
Names and labels shared by every template.
*/}}

{{- define "promotion-gate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name, truncated to 63 characters (DNS label limit). When the release name already
contains the chart name it is not repeated, so release "promotion-gate" gives "promotion-gate".
*/}}
{{- define "promotion-gate.fullname" -}}
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

{{- define "promotion-gate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "promotion-gate.labels" -}}
helm.sh/chart: {{ include "promotion-gate.chart" . }}
{{ include "promotion-gate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: promotion-gate
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "promotion-gate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "promotion-gate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of the webhook pods and objects that belong to them. */}}
{{- define "promotion-gate.webhook.selectorLabels" -}}
{{ include "promotion-gate.selectorLabels" . }}
app.kubernetes.io/component: webhook
{{- end }}

{{- define "promotion-gate.operator.selectorLabels" -}}
{{ include "promotion-gate.selectorLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "promotion-gate.operator.fullname" -}}
{{- printf "%s-operator" (include "promotion-gate.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "promotion-gate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "promotion-gate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "promotion-gate.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (include "promotion-gate.operator.fullname" .) .Values.operator.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The ValidatingWebhookConfiguration is cluster-scoped, so two releases with the same full name in two
namespaces would collide; Helm refuses the second install (ownership check), which is what we want:
one Promotion Gate per cluster.
*/}}
{{- define "promotion-gate.webhookConfigName" -}}
{{- include "promotion-gate.fullname" . }}
{{- end }}

{{/* The operator keeps the audit log's external anchor: "true" or "". */}}
{{- define "promotion-gate.auditAnchor" -}}
{{- if and .Values.operator.enabled .Values.serverKey.enabled .Values.auditAnchor.enabled -}}true{{- end -}}
{{- end }}

{{- define "promotion-gate.auditAnchorName" -}}
{{- printf "%s-audit-anchor" (include "promotion-gate.fullname" .) }}
{{- end }}

{{- define "promotion-gate.tlsSecretName" -}}
{{- if eq .Values.certificates.mode "provided" }}
{{- required "certificates.provided.secretName is required when certificates.mode=provided" .Values.certificates.provided.secretName }}
{{- else }}
{{- printf "%s-tls" (include "promotion-gate.fullname" .) }}
{{- end }}
{{- end }}

{{/*
Image reference: by digest (repository@digest) when image.digest is set, else repository:tag.
Usage: include "promotion-gate.image" (dict "image" .Values.image "default" .Chart.AppVersion)
*/}}
{{- define "promotion-gate.image" -}}
{{- $tag := default .default .image.tag -}}
{{- if .image.digest -}}
{{- printf "%s@%s" .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository $tag -}}
{{- end -}}
{{- end }}

{{/* Paths inside the containers; fixed so the policy and the docs can name them. */}}
{{- define "promotion-gate.paths.policy" -}}/etc/promotion-gate/policy/policy.yaml{{- end }}
{{- define "promotion-gate.paths.apiTokens" -}}/etc/promotion-gate/api-tokens/tokens.yaml{{- end }}
{{- define "promotion-gate.paths.serverKey" -}}/etc/promotion-gate/server-key/key.pem{{- end }}
{{- define "promotion-gate.paths.operatorKey" -}}/etc/promotion-gate/operator-key/key.pem{{- end }}
{{- define "promotion-gate.paths.validateClientCA" -}}/etc/promotion-gate/validate-client-ca/ca.crt{{- end }}
{{- define "promotion-gate.sqliteURL" -}}sqlite:////var/lib/promotion-gate/promotion-gate.db{{- end }}

{{- define "promotion-gate.storeSecretName" -}}
{{- default (printf "%s-store" (include "promotion-gate.fullname" .)) .Values.store.postgresql.existingSecret }}
{{- end }}

{{- define "promotion-gate.storeSecretKey" -}}
{{- if .Values.store.postgresql.existingSecret }}{{ .Values.store.postgresql.secretKey }}{{ else }}dsn{{ end }}
{{- end }}

{{- define "promotion-gate.apiTokensSecretName" -}}
{{- default (printf "%s-api-tokens" (include "promotion-gate.fullname" .)) .Values.apiTokens.existingSecret }}
{{- end }}

{{- define "promotion-gate.apiTokensSecretKey" -}}
{{- if .Values.apiTokens.existingSecret }}{{ .Values.apiTokens.secretKey }}{{ else }}tokens.yaml{{ end }}
{{- end }}

{{- define "promotion-gate.sqliteClaimName" -}}
{{- default (printf "%s-data" (include "promotion-gate.fullname" .)) .Values.store.sqlite.persistence.existingClaim }}
{{- end }}

{{/*
The policy document as written to policy.yaml: .Values.policy verbatim, plus what only the chart
knows (the release namespace, the mounted API tokens file).
*/}}
{{- define "promotion-gate.policy" -}}
{{- $policy := deepCopy .Values.policy -}}
{{- $namespaces := default (dict) (get $policy "namespaces") -}}
{{- if not (get $namespaces "releaseNamespace") -}}
{{- $_ := set $namespaces "releaseNamespace" .Release.Namespace -}}
{{- end -}}
{{- $_ := set $policy "namespaces" $namespaces -}}
{{- if .Values.apiTokens.enabled -}}
{{- $api := default (dict) (get $policy "api") -}}
{{- $_ := set $api "tokensFile" (include "promotion-gate.paths.apiTokens" .) -}}
{{- $_ := set $policy "api" $api -}}
{{- end -}}
{{- toYaml $policy -}}
{{- end }}

{{/*
--store for both Deployments. PostgreSQL: the DSN comes from a Secret through PROMOTION_GATE_STORE
(read by --store's envvar), so it never appears in the pod spec or the process arguments.
*/}}
{{- define "promotion-gate.storeArgs" -}}
{{- if eq .Values.store.type "sqlite" }}
- --store
- {{ include "promotion-gate.sqliteURL" . }}
{{- end }}
{{- end }}

{{- define "promotion-gate.storeEnv" -}}
{{- if eq .Values.store.type "postgresql" }}
- name: PROMOTION_GATE_STORE
  valueFrom:
    secretKeyRef:
      name: {{ include "promotion-gate.storeSecretName" . }}
      key: {{ include "promotion-gate.storeSecretKey" . }}
{{- end }}
{{- end }}

{{- define "promotion-gate.testImage" -}}
{{- if .Values.tests.image.repository -}}
{{- include "promotion-gate.image" (dict "image" .Values.tests.image "default" "latest") -}}
{{- else -}}
{{- include "promotion-gate.image" (dict "image" .Values.image "default" .Chart.AppVersion) -}}
{{- end -}}
{{- end }}
