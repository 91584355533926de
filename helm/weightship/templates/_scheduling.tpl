{{/* Where the serving pods and the seeders may run: RuntimeClass, nodeSelector, node
affinity, tolerations. */}}

{{/* Scheduling of the serving pods: RuntimeClass and nodeSelector. */}}
{{- define "weightship.gpuScheduling" -}}
{{- with .Values.gpu.runtimeClassName }}
runtimeClassName: {{ . }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Node requirements of the serving pods beyond their nodeSelector, as matchExpressions:
the GPU memory that GPU feature discovery labels (gpu.minMemoryMiB). */}}
{{- define "weightship.workloadNodeExpressions" -}}
{{- $exprs := list }}
{{- if gt (int .Values.gpu.minMemoryMiB) 0 }}
{{- $exprs = append $exprs (dict "key" "nvidia.com/gpu.memory" "operator" "Gt" "values" (list (toString (sub (int .Values.gpu.minMemoryMiB) 1)))) }}
{{- end }}
{{- toYaml $exprs }}
{{- end }}

{{/* (dict "affinity" A "exprs" E): affinity A with the matchExpressions E ANDed into every
required node-selector term (one new term when A has none). */}}
{{- define "weightship.requireNodes" -}}
{{- $affinity := deepCopy (default dict .affinity) }}
{{- if .exprs }}
{{- $nodeAffinity := default dict $affinity.nodeAffinity }}
{{- $required := default dict (get $nodeAffinity "requiredDuringSchedulingIgnoredDuringExecution") }}
{{- $terms := default list (get $required "nodeSelectorTerms") }}
{{- if $terms }}
{{- $merged := list }}
{{- range $terms }}
{{- $t := deepCopy . }}
{{- $_ := set $t "matchExpressions" (concat (default list (get $t "matchExpressions")) $.exprs) }}
{{- $merged = append $merged $t }}
{{- end }}
{{- $terms = $merged }}
{{- else }}
{{- $terms = list (dict "matchExpressions" .exprs) }}
{{- end }}
{{- $_ := set $required "nodeSelectorTerms" $terms }}
{{- $_ := set $nodeAffinity "requiredDuringSchedulingIgnoredDuringExecution" $required }}
{{- $_ := set $affinity "nodeAffinity" $nodeAffinity }}
{{- end }}
{{- if $affinity }}
{{- toYaml $affinity }}
{{- end }}
{{- end }}

{{/* Affinity of the serving pods: the user's, plus the GPU memory requirement. */}}
{{- define "weightship.affinity" -}}
{{- include "weightship.requireNodes" (dict "affinity" .Values.affinity "exprs" (include "weightship.workloadNodeExpressions" . | fromYamlArray)) }}
{{- end }}

{{/* Scheduling of the seeders (daemonset.yaml). With p2p.followWorkload: the serving pods'
RuntimeClass, nodeSelector, node affinity (not their pod (anti-)affinity: one seeder per node
anyway) and tolerations, plus p2p.gpuNodeLabel on GPU models, since a seeder requests no GPU
that would keep it off CPU-only nodes. Otherwise p2p.nodeSelector and p2p.affinity. The GPU
taint's toleration and p2p.tolerations in both cases. */}}
{{- define "weightship.peerScheduling" -}}
{{- $p2p := .Values.p2p }}
{{- $nodeSelector := $p2p.nodeSelector }}
{{- $affinity := $p2p.affinity }}
{{- $tolerations := include "weightship.gpuTolerations" . | fromYamlArray }}
{{- if $p2p.followWorkload }}
{{- with .Values.gpu.runtimeClassName }}
runtimeClassName: {{ . }}
{{- end }}
{{- $nodeSelector = .Values.nodeSelector }}
{{- $exprs := include "weightship.workloadNodeExpressions" . | fromYamlArray }}
{{- if and (gt (int .Values.gpu.count) 0) $p2p.gpuNodeLabel }}
{{- $exprs = append $exprs (dict "key" $p2p.gpuNodeLabel "operator" "Exists") }}
{{- end }}
{{- $node := pick (default dict .Values.affinity) "nodeAffinity" }}
{{- $affinity = include "weightship.requireNodes" (dict "affinity" $node "exprs" $exprs) | fromYaml }}
{{- $tolerations = concat $tolerations .Values.tolerations }}
{{- end }}
{{- $tolerations = concat $tolerations $p2p.tolerations }}
{{- with $nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
