{{/* The release-derived name prefix, max 40 characters (KubeRay appends suffixes). */}}
{{- define "oneword.fullname" -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "oneword.labels" -}}
app.kubernetes.io/name: {{ default .Chart.Name .Values.nameOverride }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "oneword.selector" -}}
app.kubernetes.io/name: {{ default .Chart.Name .Values.nameOverride }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "oneword.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}{{ default (include "oneword.fullname" .) .Values.serviceAccount.name }}{{- else -}}{{ default "default" .Values.serviceAccount.name }}{{- end -}}
{{- end -}}

{{- define "oneword.image" -}}
{{ .Values.image.repository }}:{{ default .Chart.AppVersion .Values.image.tag }}
{{- end -}}

{{/* Environment of every Ray container: object storage by reference, nothing secret inline. */}}
{{- define "oneword.env" -}}
- name: ONEWORD_S3_ENDPOINT
  value: {{ .Values.objectStorage.endpoint | quote }}
- name: ONEWORD_S3_REGION
  value: {{ .Values.objectStorage.region | quote }}
- name: ONEWORD_S3_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.objectStorage.existingSecret }}
      key: {{ .Values.objectStorage.accessKeyKey }}
- name: ONEWORD_S3_SECRET_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.objectStorage.existingSecret }}
      key: {{ .Values.objectStorage.secretKeyKey }}
- name: ONEWORD_REGISTRY
  value: {{ .Values.objectStorage.registry | quote }}
- name: AWS_REQUEST_CHECKSUM_CALCULATION
  value: WHEN_REQUIRED
{{- end -}}

{{/* A Ray pod template: image, security, env, resources. Arguments: root, role, resources, gpus, extra. */}}
{{- define "oneword.podTemplate" -}}
{{- $root := .root -}}
metadata:
  labels:
    {{- include "oneword.selector" $root | nindent 4 }}
    oneword.dev/role: {{ .role }}
spec:
  serviceAccountName: {{ include "oneword.serviceAccountName" $root }}
  automountServiceAccountToken: false
  securityContext:
    {{- toYaml $root.Values.podSecurityContext | nindent 4 }}
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: ray-{{ .role }}
      image: {{ include "oneword.image" $root }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      securityContext:
        {{- toYaml $root.Values.securityContext | nindent 8 }}
      env:
        {{- include "oneword.env" $root | nindent 8 }}
      {{- with .volumeMounts }}
      volumeMounts:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      resources:
        requests:
          {{- toYaml .resources.requests | nindent 10 }}
          {{- if .gpus }}
          nvidia.com/gpu: {{ .gpus }}
          {{- end }}
        limits:
          {{- toYaml .resources.limits | nindent 10 }}
          {{- if .gpus }}
          nvidia.com/gpu: {{ .gpus }}
          {{- end }}
  {{- with .volumes }}
  volumes:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}

{{- define "oneword.authOptions" -}}
{{- if .Values.rayAuth.enabled }}
authOptions:
  mode: token
  secretName: {{ .Values.rayAuth.existingSecret }}
{{- end }}
{{- end -}}
