{{/*
Names and labels. Every template here takes the creditgate chart's own context: `.` inside this chart,
`.Subcharts.creditgate` from an app chart that depends on it.
*/}}
{{- define "creditgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "creditgate.fullname" -}}
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

{{- define "creditgate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "creditgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "creditgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/*
The flusher's pods (flusher.separate): a name of their own, so that neither the API Service nor the
PodDisruptionBudget (which select creditgate.selectorLabels) ever selects them.
*/}}
{{- define "creditgate.flusherSelectorLabels" -}}
app.kubernetes.io/name: {{ include "creditgate.name" . }}-flusher
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: flusher
{{- end -}}

{{- define "creditgate.labels" -}}
helm.sh/chart: {{ include "creditgate.chart" . }}
{{ include "creditgate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: creditgate
{{- end -}}

{{- define "creditgate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "creditgate.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "creditgate.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/*
Render-time checks: the things creditgate would otherwise only discover when a pod starts (or never).
*/}}
{{- define "creditgate.validate" -}}
{{- if not .Values.secrets.redisUrl.name -}}
{{- fail "secrets.redisUrl.name is required: the name of an existing Secret holding redis_url (creditgate's embedded Redis is for development only)" -}}
{{- end -}}
{{- if not .Values.secrets.databaseUrl.name -}}
{{- fail "secrets.databaseUrl.name is required: the name of an existing Secret holding database_url (creditgate's embedded Postgres is for development only)" -}}
{{- end -}}
{{- if not (or .Values.config.upstream_url .Values.config.upstreams .Values.secrets.upstreamApiKey.name) -}}
{{- fail "configure an upstream: config.upstream_url, config.upstreams or secrets.upstreamApiKey (with none, creditgate starts its built-in demo upstream)" -}}
{{- end -}}
{{- $s := .Values.shutdown -}}
{{- $needed := add $s.preStopSeconds $s.graceSeconds $s.flushSeconds -}}
{{- if and (eq .Values.mode "standalone") .Values.config.account_header (not .Values.secrets.accountHeaderSecret.name) -}}
{{- fail "config.account_header in standalone mode needs secrets.accountHeaderSecret: the API listens on all addresses there, and without the secret anything that reaches the Service could bill any account with one header (creditgate would refuse to start)" -}}
{{- end -}}
{{- if and .Values.flusher.separate (ne .Values.mode "standalone") -}}
{{- fail "flusher.separate is for standalone mode only: in sidecar mode every app pod's creditgate flushes (config.flusher_enabled); to flush apart, run a standalone release with flusher.separate, or `creditgate flush` yourself" -}}
{{- end -}}
{{- if and (eq .Values.mode "standalone") (not .Values.flusher.separate) (eq (toString .Values.config.flusher_enabled) "false") -}}
{{- fail "config.flusher_enabled: false in standalone mode leaves nothing writing the outbox to the ledger: set flusher.separate: true (the chart then runs `creditgate flush` in a Deployment of its own and turns the serving pods' flusher off)" -}}
{{- end -}}
{{- if eq (int .Values.opsPort) (int .Values.containerPort) -}}
{{- fail (printf "opsPort and containerPort are both %d: the ops listener needs a port of its own" (int .Values.opsPort)) -}}
{{- end -}}
{{- if le (int .Values.terminationGracePeriodSeconds) (int $needed) -}}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed shutdown.preStopSeconds + graceSeconds + flushSeconds (%d), or Kubernetes kills creditgate before its outbox is written" (int .Values.terminationGracePeriodSeconds) (int $needed)) -}}
{{- end -}}
{{- end -}}

{{/*
The creditgate config file: `config` without unset values and empty tables.
*/}}
{{- define "creditgate.configFile" -}}
{{- $out := dict -}}
{{- range $key, $value := .Values.config -}}
{{- if not (or (kindIs "invalid" $value) (and (kindIs "map" $value) (empty $value))) -}}
{{- $_ := set $out $key $value -}}
{{- end -}}
{{- end -}}
{{- toYaml $out -}}
{{- end -}}

{{/*
The creditgate container without a restart policy: the Deployment's main container, and the body of the
native sidecar below. Volumes it mounts come from creditgate.sidecarVolumes.
*/}}
{{- define "creditgate.container" -}}
{{- include "creditgate.validate" . -}}
name: creditgate
image: {{ include "creditgate.image" . }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
args: ["serve"]
ports:
  {{- if eq .Values.mode "standalone" }}
  - name: creditgate
    containerPort: {{ .Values.containerPort }}
    protocol: TCP
  {{- end }}
  - name: ops
    containerPort: {{ .Values.opsPort }}
    protocol: TCP
env:
  {{- include "creditgate.env" . | nindent 2 }}
  {{- if and (eq .Values.mode "standalone") .Values.flusher.separate }}
  # the ledger writes run in the <fullname>-flusher Deployment (creditgate flush), not here
  - name: CREDITGATE_FLUSHER_ENABLED
    value: "false"
  {{- end }}
  {{- with .Values.extraEnv }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{ include "creditgate.probes" . }}
lifecycle:
  preStop:
    # The image has no shell; Python sleeps while the endpoints controller stops sending new requests.
    exec:
      command: ["python", "-c", "import time; time.sleep({{ .Values.shutdown.preStopSeconds }})"]
{{- with .Values.resources }}
resources:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.securityContext | nindent 2 }}
{{ include "creditgate.volumeMounts" . }}
{{- end -}}

{{/*
The environment both the serving container and the flusher's share (without extraEnv, which each adds
last): the config file, the mode, the listeners, data_dir, the shutdown timings and the Secrets.
*/}}
{{- define "creditgate.env" -}}
- name: CREDITGATE_CONFIG
  value: /etc/creditgate/config.yaml
- name: CREDITGATE_MODE
  value: {{ .Values.mode | quote }}
# sidecar: the API on the pod's loopback only (the app beside it); standalone: behind the Service
- name: CREDITGATE_HOST
  value: {{ eq .Values.mode "sidecar" | ternary "127.0.0.1" "0.0.0.0" | quote }}
- name: CREDITGATE_PORT
  value: {{ .Values.containerPort | quote }}
- name: CREDITGATE_OPS_HOST
  value: "0.0.0.0"
- name: CREDITGATE_OPS_PORT
  value: {{ .Values.opsPort | quote }}
- name: CREDITGATE_DATA_DIR
  value: /var/lib/creditgate
- name: CREDITGATE_SHUTDOWN_GRACE_SECONDS
  value: {{ .Values.shutdown.graceSeconds | quote }}
- name: CREDITGATE_SHUTDOWN_FLUSH_SECONDS
  value: {{ .Values.shutdown.flushSeconds | quote }}
{{- $secrets := dict "CREDITGATE_REDIS_URL" .Values.secrets.redisUrl "CREDITGATE_DATABASE_URL" .Values.secrets.databaseUrl }}
{{- $_ := set $secrets "CREDITGATE_ADMIN_TOKEN" .Values.secrets.adminToken }}
{{- $_ := set $secrets "CREDITGATE_UPSTREAM_API_KEY" .Values.secrets.upstreamApiKey }}
{{- $_ := set $secrets "CREDITGATE_ACCOUNT_HEADER_SECRET" .Values.secrets.accountHeaderSecret }}
{{- $_ := set $secrets "CREDITGATE_VAULT_MASTER_KEY" .Values.secrets.vaultMasterKey }}
{{- $_ := set $secrets "CREDITGATE_VAULT_PREVIOUS_KEYS" .Values.secrets.vaultPreviousKeys }}
{{- range $env, $ref := $secrets }}
{{- if $ref.name }}
- name: {{ $env }}
  valueFrom:
    secretKeyRef:
      name: {{ $ref.name }}
      key: {{ $ref.key }}
{{- end }}
{{- end }}
{{- range .Values.providerKeys }}
- name: {{ .env }}
  valueFrom:
    secretKeyRef:
      name: {{ .secretName }}
      key: {{ .key }}
{{- end }}
{{- end -}}

{{/*
The probes both containers share, on the port named ops: startup and readiness GET /readyz, liveness
GET /healthz.
*/}}
{{- define "creditgate.probes" -}}
startupProbe:
  httpGet:
    path: /readyz
    port: ops
  periodSeconds: {{ .Values.probes.startup.periodSeconds }}
  timeoutSeconds: {{ .Values.probes.startup.timeoutSeconds }}
  failureThreshold: {{ .Values.probes.startup.failureThreshold }}
readinessProbe:
  httpGet:
    path: /readyz
    port: ops
  periodSeconds: {{ .Values.probes.readiness.periodSeconds }}
  timeoutSeconds: {{ .Values.probes.readiness.timeoutSeconds }}
  failureThreshold: {{ .Values.probes.readiness.failureThreshold }}
livenessProbe:
  httpGet:
    path: /healthz
    port: ops
  periodSeconds: {{ .Values.probes.liveness.periodSeconds }}
  timeoutSeconds: {{ .Values.probes.liveness.timeoutSeconds }}
  failureThreshold: {{ .Values.probes.liveness.failureThreshold }}
{{- end -}}

{{/*
The mounts both containers share: the config file, data_dir and /tmp (creditgate.sidecarVolumes).
*/}}
{{- define "creditgate.volumeMounts" -}}
volumeMounts:
  - name: creditgate-config
    mountPath: /etc/creditgate
    readOnly: true
  - name: creditgate-data
    mountPath: /var/lib/creditgate
  - name: creditgate-tmp
    mountPath: /tmp
{{- end -}}

{{/*
creditgate as a native sidecar: an entry for the app pod's initContainers (Kubernetes >= 1.29). It starts
before the app's containers (they start once its startup probe passes), serves for the pod's lifetime and
is stopped after them, so the app's in-flight calls are settled.
*/}}
{{- define "creditgate.sidecarContainer" -}}
{{ include "creditgate.container" . }}
restartPolicy: Always
{{- end -}}

{{/*
The volumes the creditgate container mounts: its config file (the chart's ConfigMap), data_dir and /tmp.
*/}}
{{- define "creditgate.sidecarVolumes" -}}
- name: creditgate-config
  configMap:
    name: {{ include "creditgate.fullname" . }}
- name: creditgate-data
  emptyDir: {}
- name: creditgate-tmp
  emptyDir:
    medium: Memory
    sizeLimit: 64Mi
{{- end -}}

{{/*
Pod annotations that roll the pods when creditgate's config file changes.
*/}}
{{- define "creditgate.podAnnotations" -}}
checksum/creditgate-config: {{ include "creditgate.configFile" . | sha256sum }}
{{- end -}}

{{/*
The flusher's container (flusher.separate): `creditgate flush` with the serving container's config,
Secrets and environment, its ops listener for the probes and Prometheus. No API port and no preStop
pause: no Service sends it traffic, so on SIGTERM it stops reading at once, writes the batch in hand and
drains the outbox (up to shutdown.flushSeconds).
*/}}
{{- define "creditgate.flusherContainer" -}}
name: flusher
image: {{ include "creditgate.image" . }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
args: ["flush"]
ports:
  - name: ops
    containerPort: {{ .Values.opsPort }}
    protocol: TCP
env:
  {{- include "creditgate.env" . | nindent 2 }}
  {{- with .Values.extraEnv }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{ include "creditgate.probes" . }}
{{- with .Values.flusher.resources }}
resources:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.securityContext | nindent 2 }}
{{ include "creditgate.volumeMounts" . }}
{{- end -}}
