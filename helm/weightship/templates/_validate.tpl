{{/* Contradictions the schema cannot express; each message says how to fix it.
Collected first, then reported together in one `fail`, bitnami style. */}}
{{- define "weightship.validateValues" -}}
{{- $messages := list }}
{{- $v := .Values }}
{{- if and (eq $v.storage.mode "nodeCache") (not $v.storage.nodeCache.hostPathAcknowledged) }}
{{- $messages = append $messages "storage.mode=nodeCache mounts a hostPath volume, which the 'baseline' and 'restricted' Pod Security Standards forbid: label the namespace pod-security.kubernetes.io/enforce=privileged and set storage.nodeCache.hostPathAcknowledged=true, or choose emptyDir, sharedPVC or perPodPVC" }}
{{- end }}
{{- if and $v.storage.existingClaim (ne $v.storage.mode "sharedPVC") }}
{{- $messages = append $messages (printf "storage.existingClaim=%s is only used with storage.mode=sharedPVC (mode is %s)" $v.storage.existingClaim $v.storage.mode) }}
{{- end }}
{{- if and (not $v.fetch.enabled) (eq $v.storage.mode "emptyDir") }}
{{- $messages = append $messages "fetch.enabled=false with storage.mode=emptyDir: every pod would start with an empty model directory; enable fetch or use a pre-populated sharedPVC/nodeCache" }}
{{- end }}
{{- if and $v.p2p.enabled (not $v.fetch.enabled) }}
{{- $messages = append $messages "p2p.enabled=true needs fetch.enabled=true: the seeders fetch the model before they seed it" }}
{{- end }}
{{- if and $v.apiKey.existingSecret (not $v.apiKey.enabled) }}
{{- $messages = append $messages (printf "apiKey.existingSecret=%s is set but apiKey.enabled=false: enable the API key or drop the secret name" $v.apiKey.existingSecret) }}
{{- end }}
{{- if and $v.autoscaling.enabled (gt (int $v.autoscaling.minReplicas) (int $v.autoscaling.maxReplicas)) }}
{{- $messages = append $messages (printf "autoscaling.minReplicas (%d) is greater than autoscaling.maxReplicas (%d)" (int $v.autoscaling.minReplicas) (int $v.autoscaling.maxReplicas)) }}
{{- end }}
{{- $pdb := $v.podDisruptionBudget }}
{{- if and $pdb.enabled (not (kindIs "invalid" $pdb.minAvailable)) (not (kindIs "invalid" $pdb.maxUnavailable)) }}
{{- $messages = append $messages "podDisruptionBudget: set either minAvailable or maxUnavailable, not both (set the other to null)" }}
{{- end }}
{{- if and $pdb.enabled (kindIs "float64" $pdb.minAvailable) (not $v.autoscaling.enabled) }}
{{- if ge (int $pdb.minAvailable) (int $v.replicaCount) }}
{{- $messages = append $messages (printf "podDisruptionBudget.minAvailable=%d with replicaCount=%d would block every node drain: lower minAvailable or add replicas" (int $pdb.minAvailable) (int $v.replicaCount)) }}
{{- end }}
{{- end }}
{{- if and $v.ingress.enabled (not $v.ingress.hosts) }}
{{- $messages = append $messages "ingress.enabled=true needs at least one host in ingress.hosts" }}
{{- end }}
{{- range $v.serve.extraEnv }}
{{- if and (hasKey . "value") (regexMatch "(?i)(TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|ACCESS_KEY|CREDENTIAL|PRIVATE_KEY)" .name) }}
{{- $messages = append $messages (printf "serve.extraEnv %s carries a plain value; credentials must come from an existing Secret (valueFrom.secretKeyRef)" .name) }}
{{- end }}
{{- end }}
{{- if and (eq (int $v.gpu.count) 0) (gt (int $v.gpu.minMemoryMiB) 0) }}
{{- $messages = append $messages "gpu.minMemoryMiB is set but gpu.count=0 (CPU serving): set a GPU count or drop the memory requirement" }}
{{- end }}
{{- if and $v.p2p.followWorkload (or $v.p2p.nodeSelector $v.p2p.affinity) }}
{{- $messages = append $messages "p2p.nodeSelector and p2p.affinity apply only with p2p.followWorkload=false (the seeders otherwise follow the serving pods' nodeSelector and affinity): set p2p.followWorkload=false, or drop them" }}
{{- end }}
{{- if and $v.fetch.trustKey.configMap $v.fetch.trustKey.secret }}
{{- $messages = append $messages (printf "fetch.trustKey: set configMap (%s) or secret (%s), not both: the fetch trusts one key file" $v.fetch.trustKey.configMap $v.fetch.trustKey.secret) }}
{{- end }}
{{- $np := $v.networkPolicy }}
{{- if and $np.enabled $np.egress.restrict $v.fetch.enabled (not $np.egress.publicSources) (not $np.egress.sourceCIDRs) (not $np.egress.extraRules) }}
{{- $messages = append $messages "networkPolicy.egress.publicSources=false with no sourceCIDRs or extraRules leaves the fetch no source to reach: list your sources' addresses in networkPolicy.egress.sourceCIDRs (or rules in extraRules), or set networkPolicy.egress.restrict=false" }}
{{- end }}
{{- if $messages }}
{{- fail (printf "\n\nVALUES VALIDATION:\n- %s" (join "\n- " $messages)) }}
{{- end }}
{{- end }}
