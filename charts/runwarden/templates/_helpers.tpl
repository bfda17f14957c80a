{{/* The labels kustomize gives every object of manifests/ (includeSelectors: false). */}}
{{- define "runwarden.labels" -}}
app.kubernetes.io/name: runwarden
app.kubernetes.io/part-of: runwarden
{{- end }}

{{- define "runwarden.namespace" -}}
{{- .Values.namespace | default .Release.Namespace -}}
{{- end }}
