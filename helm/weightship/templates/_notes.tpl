{{/* The "send a first request" part of NOTES.txt; ctx is the root context. */}}
{{- define "weightship.notesRequest" -}}
{{- $ctx := .ctx }}
{{- $auth := "" }}
{{- if $ctx.Values.apiKey.enabled }}

The API key is in Secret {{ include "weightship.apiKeySecretName" $ctx }}:

  export WEIGHTSHIP_API_KEY=$(kubectl -n {{ $ctx.Release.Namespace }} get secret {{ include "weightship.apiKeySecretName" $ctx }} -o jsonpath='{.data.{{ $ctx.Values.apiKey.secretKey }}}' | base64 -d)
{{- $auth = " -H \"Authorization: Bearer $WEIGHTSHIP_API_KEY\"" }}
{{- end }}

Send a first request:

  curl -s {{ .url }}/v1/models{{ $auth }}
  curl -s {{ .url }}/v1/completions{{ $auth }} -H 'Content-Type: application/json' \
    -d '{"model": "{{ include "weightship.servedName" $ctx }}", "prompt": "The capital of France is", "max_tokens": 16}'
{{- end }}
