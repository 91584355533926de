{{/* Contradictions the schema cannot express, one named rule each (bitnami's validateValues.*
pattern); each prints its message, which says how to fix it, or nothing. Collected first, then
reported together in one `fail`. */}}

{{- define "weightship.validateValues.nodeCache" -}}
{{- if and (eq .Values.storage.mode "nodeCache") (not .Values.storage.nodeCache.hostPathAcknowledged) }}
{{- print "storage.mode=nodeCache mounts a hostPath volume, which the 'baseline' and 'restricted' Pod Security Standards forbid: label the namespace pod-security.kubernetes.io/enforce=privileged and set storage.nodeCache.hostPathAcknowledged=true, or choose emptyDir, sharedPVC or perPodPVC" }}
{{- end }}
{{- end }}

{{- define "weightship.validateValues.existingClaim" -}}
{{- if and .Values.storage.existingClaim (ne .Values.storage.mode "sharedPVC") }}
{{- printf "storage.existingClaim=%s is only used with storage.mode=sharedPVC (mode is %s)" .Values.storage.existingClaim .Values.storage.mode }}
{{- end }}
{{- end }}

{{- define "weightship.validateValues.fetchStorage" -}}
{{- if and (not .Values.fetch.enabled) (eq .Values.storage.mode "emptyDir") }}
{{- print "fetch.enabled=false with storage.mode=emptyDir: every pod would start with an empty model directory; enable fetch or use a pre-populated sharedPVC/nodeCache" }}
{{- end }}
{{- end }}

{{- define "weightship.validateValues.p2pFetch" -}}
{{- if and .Values.p2p.enabled (not .Values.fetch.enabled) }}
{{- print "p2p.enabled=true needs fetch.enabled=true: the seeders fetch the model before they seed it" }}
{{- end }}
{{- end }}

{{- define "weightship.validateValues.apiKeySecret" -}}
{{- if and .Values.apiKey.existingSecret (not .Values.apiKey.enabled) }}
{{- printf "apiKey.existingSecret=%s is set but apiKey.enabled=false: enable the API key or drop the secret name" .Values.apiKey.existingSecret }}
{{- end }}
{{- end }}

{{- define "weightship.validateValues.autoscaling" -}}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- printf "autoscaling.minReplicas (%d) is greater than autoscaling.maxReplicas (%d)" (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas) }}
{{- end }}
{{- end }}

{{- define "weightship.validateValues.pdbBoth" -}}
{{- $pdb := .Values.podDisruptionBudget }}
{{- if and $pdb.enabled (not (kindIs "invalid" $pdb.minAvailable)) (not (kindIs "invalid" $pdb.maxUnavailable)) }}
{{- print "podDisruptionBudget: set either minAvailable or maxUnavailable, not both (set the other to null)" }}
{{- end }}
{{- end }}

{{- define "weightship.validateValues.pdbBlocksDrain" -}}
{{- $pdb := .Values.podDisruptionBudget }}
{{- if and $pdb.enabled (kindIs "float64" $pdb.minAvailable) (not .Values.autoscaling.enabled) }}
{{- if ge (int $pdb.minAvailable) (int .Values.replicaCount) }}
{{- printf "podDisruptionBudget.minAvailable=%d with replicaCount=%d would block every node drain: lower minAvailable or add replicas" (int $pdb.minAvailable) (int .Values.replicaCount) }}
{{- end }}
{{- end }}
{{- end }}

{{- define "weightship.validateValues.ingressHosts" -}}
{{- if and .Values.ingress.enabled (not .Values.ingress.hosts) }}
{{- print "ingress.enabled=true needs at least one host in ingress.hosts" }}
{{- end }}
{{- end }}

{{- define "weightship.validateValues.extraEnvSecrets" -}}
{{- range .Values.serve.extraEnv }}
{{- if and (hasKey . "value") (regexMatch "(?i)(TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|ACCESS_KEY|CREDENTIAL|PRIVATE_KEY)" .name) }}
{{- printf "serve.extraEnv %s carries a plain value; credentials must come from an existing Secret (valueFrom.secretKeyRef)\n" .name }}
{{- end }}
{{- end }}
{{- end }}

{{- define "weightship.validateValues.gpuMemory" -}}
{{- if and (eq (int .Values.gpu.count) 0) (gt (int .Values.gpu.minMemoryMiB) 0) }}
{{- print "gpu.minMemoryMiB is set but gpu.count=0 (CPU serving): set a GPU count or drop the memory requirement" }}
{{- end }}
{{- end }}

{{- define "weightship.validateValues.p2pPlacement" -}}
{{- if and .Values.p2p.followWorkload (or .Values.p2p.nodeSelector .Values.p2p.affinity) }}
{{- print "p2p.nodeSelector and p2p.affinity apply only with p2p.followWorkload=false (the seeders otherwise follow the serving pods' nodeSelector and affinity): set p2p.followWorkload=false, or drop them" }}
{{- end }}
{{- end }}

{{- define "weightship.validateValues.trustKey" -}}
{{- if and .Values.fetch.trustKey.configMap .Values.fetch.trustKey.secret }}
{{- printf "fetch.trustKey: set configMap (%s) or secret (%s), not both: the fetch trusts one key file" .Values.fetch.trustKey.configMap .Values.fetch.trustKey.secret }}
{{- end }}
{{- end }}

{{- define "weightship.validateValues.egressSources" -}}
{{- $np := .Values.networkPolicy }}
{{- if and $np.enabled $np.egress.restrict .Values.fetch.enabled (not $np.egress.publicSources) (not $np.egress.sourceCIDRs) (not $np.egress.extraRules) }}
{{- print "networkPolicy.egress.publicSources=false with no sourceCIDRs or extraRules leaves the fetch no source to reach: list your sources' addresses in networkPolicy.egress.sourceCIDRs (or rules in extraRules), or set networkPolicy.egress.restrict=false" }}
{{- end }}
{{- end }}

{{- define "weightship.validateValues" -}}
{{- $messages := list }}
{{- range $rule := list "nodeCache" "existingClaim" "fetchStorage" "p2pFetch" "apiKeySecret" "autoscaling" "pdbBoth" "pdbBlocksDrain" "ingressHosts" "extraEnvSecrets" "gpuMemory" "p2pPlacement" "trustKey" "egressSources" }}
{{- range $message := splitList "\n" (include (printf "weightship.validateValues.%s" $rule) $) }}
{{- if $message }}
{{- $messages = append $messages $message }}
{{- end }}
{{- end }}
{{- end }}
{{- if $messages }}
{{- fail (printf "\n\nVALUES VALIDATION:\n- %s" (join "\n- " $messages)) }}
{{- end }}
{{- end }}
