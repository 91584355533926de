{{/* Pod pieces shared by the Deployment, the StatefulSet and the seeder DaemonSet. */}}

{{/* Arguments of `weightship fetch` (DESIGN.md contract); `seederFetch`: a seeder's. */}}
{{- define "weightship.fetchArgs" -}}
- fetch
- {{ .Values.model.name | quote }}
- --to
- {{ include "weightship.modelPath" . | quote }}
- --source
- {{ .Values.model.source | quote }}
{{- with .Values.model.revision }}
- --revision
- {{ . | quote }}
{{- end }}
{{- range .Values.model.include }}
- --include
- {{ . | quote }}
{{- end }}
- --wait-lock
- {{ .Values.fetch.waitLockSeconds | quote }}
{{- if .Values.p2p.enabled }}
{{- /* Peers: the seeders. A seeder's fetch serves the others while it fetches (the origin sends
about one copy: DESIGN.md, "Fleet distribution"); a serving pod's only takes. */}}
- --peers-from-dns
- {{ include "weightship.peersEndpoint" . | quote }}
- --peer-wait
- {{ .Values.p2p.peerWaitSeconds | quote }}
{{- if .seederFetch }}
- --listen
- "0.0.0.0:{{ .Values.p2p.port }}"
{{- if not (include "weightship.torrentModel" .) }}
- --seed-for
- "{{ .Values.p2p.handoverSeconds }}s"
{{- end }}
{{- end }}
{{- end }}
{{- range .Values.fetch.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{/* Credentials reach the fetch only from existing Secrets (secretKeyRef), never as values. */}}
{{- define "weightship.fetchEnv" -}}
- name: HOME
  value: /cache
- name: XDG_CACHE_HOME
  value: /cache
{{- with .Values.fetch.hfEndpoint }}
- name: HF_ENDPOINT
  value: {{ . | quote }}
{{- end }}
{{- with .Values.fetch.hfToken.existingSecret }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ . | quote }}
      key: {{ $.Values.fetch.hfToken.key | quote }}
{{- end }}
{{- with .Values.fetch.aws.existingSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ . | quote }}
      key: {{ $.Values.fetch.aws.accessKeyIdKey | quote }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . | quote }}
      key: {{ $.Values.fetch.aws.secretAccessKeyKey | quote }}
- name: AWS_SESSION_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ . | quote }}
      key: {{ $.Values.fetch.aws.sessionTokenKey | quote }}
      optional: true
{{- end }}
{{- with .Values.fetch.aws.region }}
- name: AWS_REGION
  value: {{ . | quote }}
{{- end }}
{{- with .Values.fetch.aws.endpointUrl }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- if include "weightship.trustKeyVolume" . }}
- name: WEIGHTSHIP_TRUST_KEY
  value: {{ include "weightship.trustKeyPath" . | quote }}
{{- end }}
{{- end }}

{{/* The public key that signed the sources' manifests (fetch.trustKey), from an existing
ConfigMap or Secret, as a read-only volume of the pods that fetch; empty when none is set. */}}
{{- define "weightship.trustKeyVolume" -}}
{{- $t := .Values.fetch.trustKey }}
{{- if and .Values.fetch.enabled (or $t.configMap $t.secret) }}
- name: trust-key
  {{- if $t.configMap }}
  configMap:
    name: {{ $t.configMap | quote }}
  {{- else }}
  secret:
    secretName: {{ $t.secret | quote }}
  {{- end }}
    defaultMode: 0444
    items:
      - key: {{ $t.key | quote }}
        path: trust.pub
{{- end }}
{{- end }}

{{- define "weightship.trustKeyPath" -}}
/etc/weightship/trust-key/trust.pub
{{- end }}

{{/* Writable scratch: the root filesystem is read-only, so /tmp and caches are emptyDirs. */}}
{{- define "weightship.scratchMounts" -}}
- name: tmp
  mountPath: /tmp
- name: cache
  mountPath: /cache
{{- end }}

{{- define "weightship.scratchVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.serve.scratchSize }}
- name: cache
  emptyDir:
    sizeLimit: {{ .Values.serve.scratchSize }}
{{- end }}

{{/* The "models" volume of the serving pods (perPodPVC takes it from volumeClaimTemplates). */}}
{{- define "weightship.modelVolume" -}}
{{- if eq .Values.storage.mode "emptyDir" }}
- name: models
  emptyDir:
    sizeLimit: {{ .Values.storage.size }}
{{- else if eq .Values.storage.mode "sharedPVC" }}
- name: models
  persistentVolumeClaim:
    claimName: {{ include "weightship.sharedClaimName" . }}
{{- else if eq .Values.storage.mode "nodeCache" }}
- name: models
  hostPath:
    path: {{ .Values.storage.nodeCache.path }}
    type: DirectoryOrCreate
{{- end }}
{{- end }}

{{/* Root init container that hands the kubelet-created node directory to the chart's uid;
only with storage.mode=nodeCache, whose hostPath already needs a privileged namespace. */}}
{{- define "weightship.prepareNodeCache" -}}
{{- if and (eq .Values.storage.mode "nodeCache") .Values.storage.nodeCache.prepare }}
- name: prepare-node-cache
  image: {{ include "weightship.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: ["chown", "{{ .Values.uid }}:{{ .Values.uid }}", "/models"]
  securityContext:
    runAsUser: 0
    runAsNonRoot: false
    allowPrivilegeEscalation: false
    readOnlyRootFilesystem: true
    capabilities:
      drop: ["ALL"]
      add: ["CHOWN"]
    seccompProfile:
      type: RuntimeDefault
  resources:
    requests: {cpu: 10m, memory: 16Mi}
    limits: {memory: 64Mi}
  volumeMounts:
    - name: models
      mountPath: /models
{{- end }}
{{- end }}

{{- define "weightship.fetchContainer" -}}
{{- if .Values.fetch.enabled }}
- name: fetch
  image: {{ include "weightship.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: ["weightship"]
  args:
    {{- include "weightship.fetchArgs" . | nindent 4 }}
  env:
    {{- include "weightship.fetchEnv" . | nindent 4 }}
  securityContext:
    {{- include "weightship.containerSecurityContext" . | nindent 4 }}
  resources:
    {{- toYaml .Values.fetch.resources | nindent 4 }}
  volumeMounts:
    - name: models
      mountPath: /models
    {{- include "weightship.scratchMounts" . | nindent 4 }}
    {{- if include "weightship.trustKeyVolume" . }}
    - name: trust-key
      mountPath: {{ include "weightship.trustKeyPath" . | dir }}
      readOnly: true
    {{- end }}
{{- end }}
{{- end }}

{{/* With usageLog.enabled: an init container that makes .usage on the model volume, as the
chart's uid, so that the server can mount that directory alone, writable (the kubelet would
make a missing subPath as root, where the server could not write). */}}
{{- define "weightship.usageDir" -}}
{{- if .Values.usageLog.enabled }}
- name: usage-dir
  image: {{ include "weightship.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: ["mkdir", "-p", "/models/.usage"]
  securityContext:
    {{- include "weightship.containerSecurityContext" . | nindent 4 }}
  resources:
    requests: {cpu: 10m, memory: 16Mi}
    limits: {memory: 64Mi}
  volumeMounts:
    - name: models
      mountPath: /models
{{- end }}
{{- end }}

{{/* The serving pod template (metadata + spec). */}}
{{- define "weightship.serverPodTemplate" -}}
metadata:
  labels:
    {{- include "weightship.labels" . | nindent 4 }}
    app.kubernetes.io/component: server
  {{- with .Values.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  serviceAccountName: {{ include "weightship.serviceAccountName" . }}
  automountServiceAccountToken: {{ .Values.serviceAccount.automountToken }}
  enableServiceLinks: false
  terminationGracePeriodSeconds: {{ .Values.terminationGracePeriodSeconds }}
  {{- with .Values.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- range . }}
    - name: {{ . }}
    {{- end }}
  {{- end }}
  securityContext:
    {{- include "weightship.podSecurityContext" . | nindent 4 }}
  {{- with include "weightship.gpuScheduling" . | trim }}
  {{- . | nindent 2 }}
  {{- end }}
  {{- $tolerations := include "weightship.gpuTolerations" . }}
  {{- if or $tolerations .Values.tolerations }}
  tolerations:
    {{- $tolerations | trim | nindent 4 }}
    {{- with .Values.tolerations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- end }}
  {{- if or .Values.affinity (gt (int .Values.gpu.minMemoryMiB) 0) }}
  affinity:
    {{- include "weightship.affinity" . | nindent 4 }}
  {{- end }}
  {{- if .Values.topologySpread.enabled }}
  topologySpreadConstraints:
    - maxSkew: {{ .Values.topologySpread.maxSkew }}
      topologyKey: kubernetes.io/hostname
      whenUnsatisfiable: {{ .Values.topologySpread.whenUnsatisfiable }}
      labelSelector:
        matchLabels:
          {{- include "weightship.serverSelectorLabels" . | nindent 10 }}
  {{- end }}
  {{- $init := printf "%s\n%s\n%s\n%s" (include "weightship.prepareNodeCache" .) (include "weightship.fetchContainer" .) (include "weightship.usageDir" .) (include "weightship.compileCacheDir" .) | trim }}
  {{- with $init }}
  initContainers:
    {{- . | nindent 4 }}
  {{- end }}
  containers:
    {{- include "weightship.serverContainer" . | nindent 4 }}
  volumes:
    {{- include "weightship.modelVolume" . | trim | nindent 4 }}
    {{- include "weightship.scratchVolumes" . | nindent 4 }}
    {{- with include "weightship.trustKeyVolume" . }}
    {{- . | nindent 4 }}
    {{- end }}
    - name: shm
      emptyDir:
        medium: Memory
        sizeLimit: {{ .Values.serve.shmSize }}
    {{- if .Values.apiKey.enabled }}
    - name: api-key
      secret:
        secretName: {{ include "weightship.apiKeySecretName" . }}
        defaultMode: 0440
        items:
          - key: {{ .Values.apiKey.secretKey }}
            path: api-key
    {{- end }}
{{- end }}
