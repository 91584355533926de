{{/* Names, labels and small derived values. Every helper is prefixed "weightship.". */}}

{{- define "weightship.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The object-name prefix; 52 chars leave room for suffixes such as "-peers" and "-test". */}}
{{- define "weightship.fullname" -}}
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

{{- define "weightship.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "weightship.selectorLabels" -}}
app.kubernetes.io/name: {{ include "weightship.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "weightship.labels" -}}
helm.sh/chart: {{ include "weightship.chart" . }}
{{ include "weightship.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: weightship
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector of the serving pods (the seeders carry component=peer instead). */}}
{{- define "weightship.serverSelectorLabels" -}}
{{ include "weightship.selectorLabels" . }}
app.kubernetes.io/component: server
{{- end }}

{{- define "weightship.peerSelectorLabels" -}}
{{ include "weightship.selectorLabels" . }}
app.kubernetes.io/component: peer
{{- end }}

{{- define "weightship.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "weightship.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "weightship.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The model directory's name under /models: model.dir, or model.name made path-safe. */}}
{{- define "weightship.modelDir" -}}
{{- if .Values.model.dir }}
{{- .Values.model.dir }}
{{- else }}
{{- regexReplaceAll "[^a-z0-9._-]+" (lower .Values.model.name) "-" | trimAll "-." | trunc 100 }}
{{- end }}
{{- end }}

{{/* The model id clients send (`model` in requests, /v1/models). */}}
{{- define "weightship.servedName" -}}
{{- default (include "weightship.modelDir" .) .Values.serve.servedName }}
{{- end }}

{{- define "weightship.modelPath" -}}
{{- printf "/models/%s" (include "weightship.modelDir" .) }}
{{- end }}

{{- define "weightship.apiKeySecretName" -}}
{{- default (printf "%s-api-key" (include "weightship.fullname" .)) .Values.apiKey.existingSecret }}
{{- end }}

{{- define "weightship.sharedClaimName" -}}
{{- default (printf "%s-models" (include "weightship.fullname" .)) .Values.storage.existingClaim }}
{{- end }}

{{/* DNS name of the seeders' headless Service, which fetches resolve to find peers. */}}
{{- define "weightship.peersHost" -}}
{{- printf "%s-peers.%s.svc" (include "weightship.fullname" .) .Release.Namespace }}
{{- end }}

{{/* NAME:PORT for --peers-from-dns (every A/AAAA record of NAME is a peer on PORT). */}}
{{- define "weightship.peersEndpoint" -}}
{{- printf "%s:%d" (include "weightship.peersHost" .) (int .Values.p2p.port) }}
{{- end }}

{{/* "true" when the model is fetched by BitTorrent (a magnet, a .torrent, model.source=torrent):
a seeder's fetch then passes no --seed-for (a torrent's would seed the whole time, holding the
seed container back; the swarm's ends once every seeder has verified). */}}
{{- define "weightship.torrentModel" -}}
{{- $name := .Values.model.name }}
{{- if or (hasPrefix "magnet:" $name) (hasSuffix ".torrent" $name) (eq .Values.model.source "torrent") }}true{{ end }}
{{- end }}

{{/* "true" when the serving workload is a StatefulSet (one claim per pod). */}}
{{- define "weightship.isStatefulSet" -}}
{{- if eq .Values.storage.mode "perPodPVC" }}true{{ end }}
{{- end }}

{{- define "weightship.workloadKind" -}}
{{- if include "weightship.isStatefulSet" . }}StatefulSet{{ else }}Deployment{{ end }}
{{- end }}

{{/* Tolerations shared by servers and seeders: the GPU taint, then the user's. */}}
{{- define "weightship.gpuTolerations" -}}
{{- if and (gt (int .Values.gpu.count) 0) .Values.gpu.tolerateGpuTaint }}
- key: {{ .Values.gpu.resourceName }}
  operator: Exists
  effect: NoSchedule
{{- end }}
{{- end }}

{{/* Restricted-PSS container securityContext. */}}
{{- define "weightship.containerSecurityContext" -}}
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: {{ .Values.uid }}
runAsGroup: {{ .Values.uid }}
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "weightship.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.uid }}
runAsGroup: {{ .Values.uid }}
fsGroup: {{ .Values.uid }}
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end }}
