{{/* The `weightship serve` container (DESIGN.md contract). */}}
{{- define "weightship.serverContainer" -}}
- name: serve
  image: {{ include "weightship.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: ["weightship"]
  args:
    - serve
    - {{ include "weightship.modelPath" . | quote }}
    - --host
    - "0.0.0.0"
    - --port
    - {{ .Values.serve.port | quote }}
    - --device
    - {{ ternary "cuda" "cpu" (gt (int .Values.gpu.count) 0) | quote }}
    - --name
    - {{ include "weightship.servedName" . | quote }}
    - --dtype
    - {{ .Values.serve.dtype | quote }}
    - --max-batch
    - {{ .Values.serve.maxBatch | quote }}
    {{- if gt (int .Values.serve.maxModelLen) 0 }}
    - --max-model-len
    - {{ .Values.serve.maxModelLen | quote }}
    {{- end }}
    {{- if .Values.apiKey.enabled }}
    - --api-key-file
    - /etc/weightship/api-key/api-key
    {{- end }}
    {{- if .Values.usageLog.enabled }}
    - --usage-log
    - /var/lib/weightship/usage/$(POD_NAME).jsonl
    {{- end }}
    {{- if .Values.serve.compileCache }}
    - --compile-cache
    - /var/lib/weightship/compile-cache
    {{- end }}
    {{- range .Values.serve.extraArgs }}
    - {{ . | quote }}
    {{- end }}
  env:
    - name: HOME
      value: /cache
    - name: XDG_CACHE_HOME
      value: /cache
    - name: HF_HUB_OFFLINE
      value: "1"
    - name: TRITON_CACHE_DIR
      value: /cache/triton
    - name: TORCHINDUCTOR_CACHE_DIR
      value: /cache/torchinductor
    {{- if .Values.usageLog.enabled }}
    - name: POD_NAME
      valueFrom:
        fieldRef:
          fieldPath: metadata.name
    {{- end }}
    {{- with .Values.serve.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  ports:
    - name: http
      containerPort: {{ .Values.serve.port }}
      protocol: TCP
  startupProbe:
    httpGet:
      path: /health
      port: http
    periodSeconds: {{ .Values.probes.startup.periodSeconds }}
    failureThreshold: {{ .Values.probes.startup.failureThreshold }}
    timeoutSeconds: 5
  readinessProbe:
    httpGet:
      path: /ready
      port: http
    periodSeconds: {{ .Values.probes.readiness.periodSeconds }}
    failureThreshold: {{ .Values.probes.readiness.failureThreshold }}
    timeoutSeconds: 5
  livenessProbe:
    httpGet:
      path: /health
      port: http
    periodSeconds: {{ .Values.probes.liveness.periodSeconds }}
    failureThreshold: {{ .Values.probes.liveness.failureThreshold }}
    timeoutSeconds: 5
  securityContext:
    {{- include "weightship.containerSecurityContext" . | nindent 4 }}
  resources:
    {{- $resources := deepCopy .Values.serve.resources }}
    {{- if gt (int .Values.gpu.count) 0 }}
    {{- $limits := default dict $resources.limits }}
    {{- $requests := default dict $resources.requests }}
    {{- $_ := set $limits .Values.gpu.resourceName (int .Values.gpu.count) }}
    {{- $_ := set $requests .Values.gpu.resourceName (int .Values.gpu.count) }}
    {{- $_ := set $resources "limits" $limits }}
    {{- $_ := set $resources "requests" $requests }}
    {{- end }}
    {{- toYaml $resources | nindent 4 }}
  volumeMounts:
    - name: models
      mountPath: /models
      readOnly: true
    {{- include "weightship.scratchMounts" . | nindent 4 }}
    - name: shm
      mountPath: /dev/shm
    {{- if .Values.apiKey.enabled }}
    - name: api-key
      mountPath: /etc/weightship/api-key
      readOnly: true
    {{- end }}
    {{- if .Values.usageLog.enabled }}
    {{- /* only the usage directory of the model volume is writable (see weightship.usageDir) */}}
    - name: models
      mountPath: /var/lib/weightship/usage
      subPath: .usage
    {{- end }}
    {{- if .Values.serve.compileCache }}
    - name: models
      mountPath: /var/lib/weightship/compile-cache
      subPath: .compile-cache
    {{- end }}
{{- end }}

{{/* With serve.compileCache: an init container that makes .compile-cache on the model volume
as the chart's uid (as weightship.usageDir does for .usage), where `serve --compile-cache` keeps
what torch.compile made for the next start. */}}
{{- define "weightship.compileCacheDir" -}}
{{- if .Values.serve.compileCache }}
- name: compile-cache-dir
  image: {{ include "weightship.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: ["mkdir", "-p", "/models/.compile-cache"]
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
