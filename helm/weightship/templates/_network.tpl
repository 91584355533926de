{{/* Pieces of the NetworkPolicies (networkpolicy.yaml). Policies see the pod behind a Service,
so the ports here are container ports (serve.port), never the Service's port. */}}

{{/* Selector of the `helm test` pod. */}}
{{- define "weightship.testSelectorLabels" -}}
{{ include "weightship.selectorLabels" . }}
app.kubernetes.io/component: test
{{- end }}

{{/* Egress to DNS (port 53, UDP and TCP), to networkPolicy.egress.dns or anywhere. */}}
{{- define "weightship.egressDns" -}}
- ports:
    - port: 53
      protocol: UDP
    - port: 53
      protocol: TCP
  {{- with .Values.networkPolicy.egress.dns }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{/* The ipBlocks of the model's sources: the public internet of each family minus its
publicExcept ranges and clusterCIDRs (an except must lie inside its cidr, so each family gets
its own), and sourceCIDRs as given. Empty when neither is asked for. */}}
{{- define "weightship.sourceBlocks" -}}
{{- $egress := .Values.networkPolicy.egress }}
{{- if $egress.publicSources }}
{{- range $family := list "0.0.0.0/0" "::/0" }}
{{- $v6 := contains ":" $family }}
{{- $except := list }}
{{- range concat $egress.publicExcept $.Values.networkPolicy.clusterCIDRs | uniq }}
{{- if eq (contains ":" .) $v6 }}
{{- $except = append $except . }}
{{- end }}
{{- end }}
- ipBlock:
    cidr: {{ $family | quote }}
    {{- with $except }}
    except:
      {{- toYaml . | nindent 6 }}
    {{- end }}
{{- end }}
{{- end }}
{{- range $egress.sourceCIDRs }}
- ipBlock:
    cidr: {{ . | quote }}
{{- end }}
{{- end }}

{{/* Egress of a pod that fetches the model (a server or a seeder): DNS, the seeders' P2P port,
the sources, and the user's extra rules. */}}
{{- define "weightship.fetchEgress" -}}
{{- include "weightship.egressDns" . }}
{{- if .Values.p2p.enabled }}
- ports:
    - port: {{ .Values.p2p.port }}
      protocol: TCP
  to:
    - podSelector:
        matchLabels:
          {{- include "weightship.peerSelectorLabels" . | nindent 10 }}
{{- end }}
{{- with include "weightship.sourceBlocks" . | trim }}
- ports:
    {{- range $.Values.networkPolicy.egress.sourcePorts }}
    - port: {{ . }}
      protocol: TCP
    {{- end }}
  to:
    {{- . | nindent 4 }}
{{- end }}
{{- with .Values.networkPolicy.egress.extraRules }}
{{ toYaml . }}
{{- end }}
{{- end }}
